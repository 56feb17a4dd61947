"""Kandinsky 5 generation: the stock diffusers pipelines with a serving-grade denoising loop.

`K5T2IPipeline` and `K5I2IPipeline` subclass diffusers' `Kandinsky5T2IPipeline` / `Kandinsky5I2IPipeline`,
so they load the very same checkpoints through the very same `from_pretrained` and reuse their prompt
encoding (Qwen2.5-VL + CLIP) and VAE. Only the loop is ours, because the stock `__call__` cannot do what
a server needs:

* a fresh scheduler per request (schedulers are stateful), chosen by Runware name;
* the request's generators passed to `scheduler.step`, so stochastic samplers reproduce from a seed;
* one generator per image (seed + i) for the initial noise, so image i is the same whether it was
  asked for alone or inside a batch of `numberResults`;
* the timestep fed in float32 (stock casts it to bf16 first, which quantises t by up to 2/1000);
* latents kept in float32 between steps, cast to the transformer dtype only for the forward pass;
* input images encoded with the VAE's mean (deterministic, the same for every image of a batch);
* image-to-image on the T2I model (`init_image` + `strength`), which the stock pipeline lacks;
* a per-step callback for progress and timing;
* the text encoders' outputs kept in a bounded LRU (`prompt_cache.PromptCache`), so a repeated prompt, above
  all the negative one, is not encoded again;
* step caching (TeaCache, First Block Cache, DBCache; `accel/`) with each CFG branch in its own cache context.
"""

from __future__ import annotations

import time

import torch
from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline
from diffusers.utils.torch_utils import randn_tensor
from k5serve.accel import AccelSettings
from k5serve.accel.hooks import Recorder
from k5serve.accel.session import StepCache
from PIL import Image

from .device import offload_text_encoders
from .prompt_cache import PromptCache, image_digest
from .schedulers import make_scheduler, scheduler_step
from .worker import GenerationOutput, GenerationSpec, ProgressCallback


def _repeat(encoded, n: int):
    """One prompt's (qwen, clip, cu_seqlens) for n images, as diffusers' `encode_prompt` repeats them."""
    if n == 1:
        return encoded
    qwen, clip, cu_seqlens = encoded
    qwen = qwen.repeat(1, n, 1).view(n, -1, qwen.shape[-1])
    clip = clip.repeat(1, n, 1).view(n, -1)
    lengths = cu_seqlens.diff().repeat_interleave(n)
    cu_seqlens = torch.cat([torch.zeros(1, device=lengths.device, dtype=torch.int32), lengths.cumsum(0)])
    return qwen, clip, cu_seqlens


class _K5Loop:
    """The denoising loop and helpers shared by the T2I and I2I pipelines (a mixin over the stock classes)."""

    prompt_cache: PromptCache | None = None  # set by the engine; None: every prompt is encoded
    text_encoder_quant: str = "none"  # set by the loader: how the Qwen encoder's weights are quantised

    def _encoded(self, prompt: str, counts: dict[str, int], image: Image.Image | None = None):
        """`encode_prompt` for one prompt, through the prompt cache, repeated for the spec's images per prompt.

        The cache holds the one-image encoding (so `numberResults` does not multiply its memory or split its
        hits); `_repeat` then makes exactly what `encode_prompt(num_images_per_prompt=n)` returns."""
        device, dtype = self._execution_device, self.transformer.dtype
        extra = {} if image is None else {"image": [image]}

        def encode():
            return self.encode_prompt(prompt, num_images_per_prompt=1, device=device, dtype=dtype, **extra)

        if self.prompt_cache is None:
            counts["misses"] += 1
            return _repeat(encode(), counts["images"])
        key = (type(self).__name__, prompt, str(device), str(dtype), self.text_encoder_quant, image_digest(image))
        value, hit = self.prompt_cache.get(key, encode)
        counts["hits" if hit else "misses"] += 1
        return _repeat(value, counts["images"])

    def _run(
        self,
        spec: GenerationSpec,
        cond,
        uncond,
        on_step: ProgressCallback | None,
        accel: AccelSettings,
        recorder: Recorder | None,
        init_latents: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
    ) -> GenerationOutput:
        started = time.perf_counter()
        device = self._execution_device
        n = spec.num_images
        generators = [torch.Generator("cpu").manual_seed(s) for s in spec.seeds]
        h, w = spec.height // self.vae_scale_factor_spatial, spec.width // self.vae_scale_factor_spatial
        noise = randn_tensor((n, 1, h, w, 16), generator=generators, device=device, dtype=torch.float32)

        scheduler = make_scheduler(spec.scheduler)
        scheduler.set_timesteps(spec.steps, device=device)
        timesteps = scheduler.timesteps
        latents = noise
        start = 0
        if init_latents is not None:
            # Image-to-image: start `strength` of the way into the schedule from the noised image.
            start = spec.steps - min(spec.steps, int(round(spec.steps * spec.strength)))
            timesteps = timesteps[start:]
            if start:
                scheduler.set_begin_index(start)
            sigma = float(scheduler.sigmas[start]) if len(timesteps) else 0.0
            latents = (1.0 - sigma) * init_latents + sigma * noise

        visual_rope_pos = [torch.arange(1, device=device), torch.arange(h // 2, device=device),
                           torch.arange(w // 2, device=device)]
        step_seconds: list[float] = []
        if on_step is not None:
            on_step(0, len(timesteps))
        cache = StepCache(self.transformer, spec.cache, first_step=start, num_steps=len(timesteps),
                          branches=("cond", "uncond") if uncond is not None else ("cond",),
                          teacache_coefficients=accel.teacache_coefficients,
                          dbcache_fn_blocks=accel.dbcache_fn_blocks, recorder=recorder)
        with cache:
            for i, t in enumerate(timesteps):
                step_start = time.perf_counter()
                step = start + i  # the schedule step: what the cache window counts
                timestep = t.to(torch.float32).expand(n)
                model_in = latents if condition is None else torch.cat([latents, condition], dim=-1)
                with cache.step("cond", step):
                    velocity = self._velocity(model_in, timestep, cond, visual_rope_pos)
                if uncond is not None:
                    with cache.step("uncond", step):
                        uncond_velocity = self._velocity(model_in, timestep, uncond, visual_rope_pos)
                    velocity = uncond_velocity + spec.guidance_scale * (velocity - uncond_velocity)
                latents = scheduler_step(scheduler, velocity.float(), t, latents, generators)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_seconds.append(time.perf_counter() - step_start)
                if on_step is not None:
                    on_step(i + 1, len(timesteps))

        images = self._decode(latents)
        self.maybe_free_model_hooks()
        return GenerationOutput(images=images, seeds=spec.seeds, width=spec.width, height=spec.height,
                                seconds=time.perf_counter() - started, step_seconds=step_seconds,
                                cache_stats=cache.stats.as_dict())

    def _prompts(self, spec: GenerationSpec, image: Image.Image | None = None):
        """-> (cond, uncond or None without CFG, {"hits", "misses"} of the prompt cache for this request)."""
        counts = {"images": spec.num_images, "hits": 0, "misses": 0}
        try:
            cond = self._encoded(spec.prompt, counts, image)
            uncond = self._encoded(spec.negative_prompt, counts, image) if spec.guidance_scale > 1.0 else None
        finally:
            offload_text_encoders(self)  # (--text-encoder-offload: off the GPU until the next prompt to encode)
        return cond, uncond, {"hits": counts["hits"], "misses": counts["misses"]}

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

    def _encode_image(self, image: Image.Image) -> torch.Tensor:
        """An RGB image already at the output size -> (1, 1, h, w, 16) scaled latents (the VAE mean)."""
        device = self._execution_device
        pixels = self.image_processor.preprocess(image, height=image.height, width=image.width)
        latent = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist.mode()
        return (latent.float() * self.vae.config.scaling_factor).permute(0, 2, 3, 1).unsqueeze(1)

    def _decode(self, latents: torch.Tensor):
        # (B, 1, h, w, C) channels-last latents -> (B, C, h, w) for the VAE.
        latents = latents.squeeze(1).permute(0, 3, 1, 2)
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.image_processor.postprocess(self.vae.decode(latents).sample, output_type="pil")


class K5T2IPipeline(_K5Loop, Kandinsky5T2IPipeline):
    @torch.no_grad()
    def generate(self, spec: GenerationSpec, on_step: ProgressCallback | None = None, *,
                 accel: AccelSettings = AccelSettings(), recorder: Recorder | None = None) -> GenerationOutput:
        """`accel`: the operator's step-cache settings; `recorder`: TeaCache calibration's observer."""
        cond, uncond, prompt_counts = self._prompts(spec)
        init = None
        if spec.init_image is not None:
            init = self._encode_image(spec.init_image).expand(spec.num_images, -1, -1, -1, -1)
        output = self._run(spec, cond, uncond, on_step, accel, recorder, init_latents=init)
        output.prompt_cache = prompt_counts
        return output


class K5I2IPipeline(_K5Loop, Kandinsky5I2IPipeline):
    """Instruction editing: the reference image conditions both Qwen-VL and the transformer's input."""

    @torch.no_grad()
    def generate(self, spec: GenerationSpec, on_step: ProgressCallback | None = None, *,
                 accel: AccelSettings = AccelSettings(), recorder: Recorder | None = None) -> GenerationOutput:
        assert spec.reference_image is not None, "the I2I pipeline needs a reference image"
        cond, uncond, prompt_counts = self._prompts(spec, spec.reference_image)
        image_latents = self._encode_image(spec.reference_image).expand(spec.num_images, -1, -1, -1, -1)
        # The transformer sees noise (16), the image latents (16) and a ones-mask (1): 33 channels.
        condition = torch.cat([image_latents, torch.ones_like(image_latents[..., :1])], dim=-1)
        output = self._run(spec, cond, uncond, on_step, accel, recorder, condition=condition)
        output.prompt_cache = prompt_counts
        return output
