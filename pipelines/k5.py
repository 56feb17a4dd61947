"""Kandinsky 5 text-to-image generation: the stock diffusers pipeline with a serving-grade denoising loop.

`K5T2IPipeline` subclasses diffusers' `Kandinsky5T2IPipeline`, so it loads the very same checkpoints
through the very same `from_pretrained` and reuses its prompt encoding, latent preparation and VAE
decoding. Only the loop is ours, because the stock `__call__` cannot do what a server needs:

* a fresh scheduler per request (schedulers are stateful), chosen by Runware name;
* the request's generators passed to `scheduler.step`, so stochastic samplers reproduce from a seed;
* one generator per image (seed + i) for the initial noise, so image i is the same whether it was
  asked for alone or inside a batch of `numberResults`;
* the timestep fed in float32 (stock casts it to bf16 first, which quantises t by up to 2/1000);
* latents kept in float32 between steps, cast to the transformer dtype only for the forward pass;
* a per-step callback for progress and timing.
"""

from __future__ import annotations

import time

import torch
from diffusers import Kandinsky5T2IPipeline

from .schedulers import make_scheduler, scheduler_step
from .spec import GenerationOutput, GenerationSpec, ProgressCallback


class K5T2IPipeline(Kandinsky5T2IPipeline):
    @torch.no_grad()
    def generate(self, spec: GenerationSpec, on_step: ProgressCallback | None = None) -> GenerationOutput:
        started = time.perf_counter()
        device = self._execution_device
        dtype = self.transformer.dtype
        n = spec.num_images
        generators = [torch.Generator("cpu").manual_seed(s) for s in spec.seeds]

        cond = self.encode_prompt(spec.prompt, num_images_per_prompt=n, device=device, dtype=dtype)
        uncond = None
        if spec.guidance_scale > 1.0:
            uncond = self.encode_prompt(spec.negative_prompt, num_images_per_prompt=n, device=device, dtype=dtype)

        scheduler = make_scheduler(spec.scheduler)
        scheduler.set_timesteps(spec.steps, device=device)
        latents = self.prepare_latents(
            batch_size=n,
            num_channels_latents=self.transformer.config.in_visual_dim,
            height=spec.height,
            width=spec.width,
            dtype=torch.float32,
            device=device,
            generator=generators,
        )
        visual_rope_pos = [
            torch.arange(1, device=device),
            torch.arange(spec.height // self.vae_scale_factor_spatial // 2, device=device),
            torch.arange(spec.width // self.vae_scale_factor_spatial // 2, device=device),
        ]

        step_seconds: list[float] = []
        if on_step is not None:
            on_step(0, spec.steps)
        for i, t in enumerate(scheduler.timesteps):
            step_start = time.perf_counter()
            timestep = t.to(torch.float32).expand(n)
            velocity = self._velocity(latents, timestep, cond, visual_rope_pos)
            if uncond is not None:
                uncond_velocity = self._velocity(latents, timestep, uncond, visual_rope_pos)
                velocity = uncond_velocity + spec.guidance_scale * (velocity - uncond_velocity)
            latents = scheduler_step(scheduler, velocity.float(), t, latents, generators)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_seconds.append(time.perf_counter() - step_start)
            if on_step is not None:
                on_step(i + 1, spec.steps)

        images = self._decode(latents, spec.height, spec.width)
        self.maybe_free_model_hooks()
        return GenerationOutput(
            images=images,
            seeds=spec.seeds,
            width=spec.width,
            height=spec.height,
            seconds=time.perf_counter() - started,
            step_seconds=step_seconds,
        )

    def _velocity(self, latents, timestep, text, visual_rope_pos) -> torch.Tensor:
        """One transformer pass for one CFG branch; `text` is what `encode_prompt` returned."""
        qwen, clip, cu_seqlens = text
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=qwen.to(dtype),
            pooled_projections=clip.to(dtype),
            timestep=timestep,
            visual_rope_pos=visual_rope_pos,
            text_rope_pos=torch.arange(int(cu_seqlens.diff().max()), device=latents.device),
            scale_factor=[1.0, 1.0, 1.0],
            sparse_params=None,
            return_dict=True,
        ).sample  # (with return_dict=False this transformer returns the bare tensor, not a tuple)

    def _decode(self, latents: torch.Tensor, height: int, width: int):
        # (B, 1, h, w, C) channels-last latents -> (B, C, h, w) for the VAE.
        channels = self.transformer.config.in_visual_dim
        latents = latents[..., :channels].squeeze(1).permute(0, 3, 1, 2)
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(latents).sample
        return self.image_processor.postprocess(image, output_type="pil")
