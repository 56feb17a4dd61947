"""The full-size Kandinsky 5.0 T2I Lite architecture with random weights, built on a device with no download:
what `benchmarks/bench_gpu.py` measures speed and memory on (speed does not depend on weight values).

The configurations below are those of the published checkpoint's config files
(`kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers`: `transformer/config.json`; its `text_encoder` is
`Qwen/Qwen2.5-VL-7B-Instruct`, `text_encoder_2` the text model of `openai/clip-vit-large-patch14`, and `vae`
the FLUX.1-dev autoencoder), reproduced field by field. The tokenizers are the tiny checkpoint's byte-level BPEs
(their ids all fall inside the real vocabularies), so prompts have about the same number of tokens as with
the real ones, and the template cut (40 Qwen tokens for T2I) still lands where the pipeline expects.
"""

from __future__ import annotations

from typing import Any

TRANSFORMER = dict(
    in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=512, patch_size=(1, 2, 2),
    model_dim=2560, ff_dim=10240, num_text_blocks=2, num_visual_blocks=50, axes_dims=(32, 48, 48),
    visual_cond=False, attention_type="regular",
)

QWEN_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    sliding_window=32768, max_window_layers=28, attention_dropout=0.0,
)

QWEN_VISION = dict(
    depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
    out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
)

CLIP_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)

VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, act_fn="silu", block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
    use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True,
)


def _on(device, dtype, build):
    """Build a module with its parameters created on `device` in `dtype` (no host copy, no fp32 detour)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(previous)


def build_transformer(device, dtype, *, seed: int = 0, config: dict[str, Any] | None = None):
    """The transformer with random weights; `_keep_in_fp32_modules` in float32, as `from_pretrained` leaves them."""
    import torch
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    model = _on(device, dtype, lambda: Kandinsky5Transformer3DModel(**(config or TRANSFORMER)))
    keep = set(Kandinsky5Transformer3DModel._keep_in_fp32_modules)
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()
    # Random AdaLN modulation (zero at init), small, so activations stay finite through 50 blocks.
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Kandinsky5Modulation":
                module.out_layer.weight.normal_(0, 0.02)
                module.out_layer.bias.normal_(0, 0.02)
    return model.eval()


def _configs():
    """The Qwen2.5-VL and CLIP configurations, with the tiny tokenizers' special-token ids."""
    from transformers import CLIPTextConfig, Qwen2_5_VLConfig

    from .tiny import QWEN_SPECIAL_TOKENS, make_clip_tokenizer, make_qwen_tokenizer

    qwen_tok, clip_tok = make_qwen_tokenizer(), make_clip_tokenizer()
    ids = {t: qwen_tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    qwen_config = Qwen2_5_VLConfig(
        text_config=dict(QWEN_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=QWEN_VISION, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    clip_config = CLIPTextConfig(**CLIP_TEXT, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                 pad_token_id=clip_tok.pad_token_id)
    return qwen_tok, clip_tok, qwen_config, clip_config


def meta_components(editing: bool = False) -> dict:
    """The full-size models on the meta device (no memory), in float32: what the memory plan of the published
    checkpoint is computed from (`pipelines.memory.plan`), without the checkpoint. `editing`: with the I2I
    model's transformer too (33 input channels: noise, image latents, mask), which shares the rest."""
    import torch
    from diffusers import AutoencoderKL, Kandinsky5Transformer3DModel
    from transformers import CLIPTextModel, Qwen2_5_VLForConditionalGeneration

    _, _, qwen_config, clip_config = _configs()
    with torch.device("meta"):
        components = {"transformer": Kandinsky5Transformer3DModel(**TRANSFORMER),
                      "text_encoder": Qwen2_5_VLForConditionalGeneration(qwen_config),
                      "text_encoder_2": CLIPTextModel(clip_config), "vae": AutoencoderKL(**VAE)}
        if editing:
            components["transformer_i2i"] = Kandinsky5Transformer3DModel(**dict(TRANSFORMER, visual_cond=True))
        return components


def build_pipeline(cls, device, dtype, *, seed: int = 0, transformer=None):
    """A `cls` pipeline (`Kandinsky5T2IPipeline` or a subclass) of the full-size architecture with random weights
    on `device`."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, Qwen2_5_VLForConditionalGeneration

    from .tiny import make_qwen_processor, make_scheduler

    qwen_tok, clip_tok, qwen_config, clip_config = _configs()
    torch.manual_seed(seed + 1)
    qwen = _on(device, dtype, lambda: Qwen2_5_VLForConditionalGeneration(qwen_config)).eval()
    clip = _on(device, dtype, lambda: CLIPTextModel(clip_config)).eval()
    vae = _on(device, dtype, lambda: AutoencoderKL(**VAE)).eval()
    pipe = cls(transformer=transformer if transformer is not None else build_transformer(device, dtype,
                                                                                                    seed=seed),
                         vae=vae, text_encoder=qwen, tokenizer=make_qwen_processor(qwen_tok), text_encoder_2=clip,
                         tokenizer_2=clip_tok, scheduler=make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
