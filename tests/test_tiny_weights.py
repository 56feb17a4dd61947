"""The generated tiny Kandinsky 5 checkpoints (weights/tiny.py): loadable, reproducible, and not degenerate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from k5serve.weights import tiny
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
PROMPT = "a red fox in the snow"
# Anything above 1/255 on average is a visible, reproducible change; the tiny model gives about 3..40.
MIN_DIFF = 1.0


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: tiny.build_tiny(root / kind, kind) for kind in tiny.KINDS}


@pytest.fixture(scope="module")
def t2i(built):
    from diffusers import Kandinsky5T2IPipeline

    pipe = Kandinsky5T2IPipeline.from_pretrained(built["t2i"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def i2i(built):
    from diffusers import Kandinsky5I2IPipeline

    pipe = Kandinsky5I2IPipeline.from_pretrained(built["i2i"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str = PROMPT, **kw) -> np.ndarray:
    """uint8 HxWx3 image; 1024x1024 (every size snaps to a >= 640x1024 bucket anyway), 10 steps, seed 0."""
    kw = {"height": 1024, "width": 1024, "num_inference_steps": 10, "guidance_scale": 3.5, **kw}
    image = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kw).image[0]
    return np.asarray(image)


@pytest.fixture(scope="module")
def base_cfg(t2i) -> np.ndarray:
    return generate(t2i)


@pytest.fixture(scope="module")
def base_nocfg(t2i) -> np.ndarray:
    return generate(t2i, guidance_scale=1.0)


# --- files -------------------------------------------------------------------------------------------------------
def test_build_is_byte_identical_in_process_and_in_a_subprocess(built, tmp_path):
    again = tiny.build_tiny(tmp_path / "again", "t2i")
    assert files(again) == files(built["t2i"])
    code = "import sys, weights.tiny as t; [t.build_tiny(sys.argv[1] + '/' + k, k) for k in t.KINDS]"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub")], cwd=ROOT, check=True, capture_output=True)
    for kind in tiny.KINDS:
        assert files(tmp_path / "sub" / kind) == files(built[kind]), kind


def test_t2i_and_i2i_share_encoders_tokenizers_and_vae_byte_for_byte(built):
    for component in SHARED:
        assert files(built["t2i"] / component) == files(built["i2i"] / component), component
    assert files(built["t2i"] / "transformer") != files(built["i2i"] / "transformer")


def test_small_and_free_of_paths(built):
    blobs = [b for kind in tiny.KINDS for b in files(built[kind]).values()]
    assert sum(map(len, blobs)) < 10 * 2**20  # both folders together (about 3.8 MB)
    assert not any(str(built["t2i"].parent).encode() in b for b in blobs)
    assert (built["t2i"] / tiny.MARKER).read_text().strip() == tiny.TINY_BUILDER_VERSION


def test_ensure_tiny_builds_once_and_rebuilds_when_stale(tmp_path, monkeypatch):
    path = tiny.ensure_tiny(tmp_path, "t2i")
    assert path == tmp_path / "t2i" and (path / "model_index.json").is_file()
    calls = []
    real_build = tiny.build_tiny
    monkeypatch.setattr(tiny, "build_tiny", lambda out, kind: calls.append(kind) or real_build(out, kind))
    assert tiny.ensure_tiny(tmp_path, "t2i") == path and calls == []  # fresh: untouched
    (path / tiny.MARKER).write_text("older-builder\n")
    assert tiny.ensure_tiny(tmp_path, "t2i") == path and calls == ["t2i"]
    assert (path / tiny.MARKER).read_text().strip() == tiny.TINY_BUILDER_VERSION
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["t2i"]  # no temp/stale folders left
    with pytest.raises(ValueError):
        tiny.ensure_tiny(tmp_path, "t2v")


# --- loading and configuration -------------------------------------------------------------------------------
def test_loads_through_the_real_pipeline_classes_with_the_real_component_classes(t2i, i2i):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Kandinsky5Transformer3DModel
    from transformers import (
        CLIPTextModel,
        CLIPTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    for pipe in (t2i, i2i):
        assert isinstance(pipe.transformer, Kandinsky5Transformer3DModel)
        assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
        assert isinstance(pipe.tokenizer, Qwen2VLProcessor)
        assert isinstance(pipe.tokenizer.image_processor, Qwen2VLImageProcessor)
        assert pipe.tokenizer.video_processor is not None
        assert isinstance(pipe.text_encoder_2, CLIPTextModel) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
        assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
        assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
        vae = pipe.vae.config
        assert vae.latent_channels == 16 and vae.scaling_factor == 0.3611 and len(vae.block_out_channels) == 4
        cfg = pipe.transformer.config
        assert cfg.in_visual_dim == cfg.out_visual_dim == 16 and tuple(cfg.patch_size) == (1, 2, 2)
        assert cfg.in_text_dim == pipe.text_encoder.config.text_config.hidden_size
        assert cfg.in_text_dim2 == pipe.text_encoder_2.config.hidden_size
        assert pipe.text_encoder.config.image_token_id == pipe.tokenizer.image_token_id
    assert t2i.transformer.config.visual_cond is False and i2i.transformer.config.visual_cond is True
    assert i2i.transformer.visual_embeddings.in_layer.in_features == 4 * (2 * 16 + 1)  # noise, image latent, mask


# --- tokenizers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", tiny.KINDS)
def test_template_prefix_is_exactly_the_tokens_the_pipeline_cuts(kind, t2i, i2i):
    pipe = t2i if kind == "t2i" else i2i
    template, start = pipe.prompt_template, pipe.prompt_template_encode_start_idx
    assert (template, start) == ((tiny.T2I_TEMPLATE, 40) if kind == "t2i" else (tiny.I2I_TEMPLATE, 54))
    tok = pipe.tokenizer.tokenizer
    prefix, suffix = template.split("{}")
    assert len(tok(prefix)["input_ids"]) == start
    prompts = ["a red fox in the snow", "Turn it into a watercolor painting", "usual users", "x", "Über 123 ünïcode"]
    for prompt in prompts:
        ids = tok(template.format(prompt))["input_ids"]
        assert tok.decode(ids[start:]) == prompt + suffix, prompt  # the prompt survives the slice, whole


def test_encoded_prompt_is_prompt_tokens_plus_im_end(t2i):
    tok = t2i.tokenizer.tokenizer
    for prompt in ("a red fox in the snow", ""):
        _, pooled, cu_seqlens = t2i.encode_prompt(prompt, device="cpu", dtype=torch.float32)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert int(cu_seqlens[-1]) == n_prompt + 1 and pooled.shape == (1, 32)


def test_i2i_processor_expands_the_image_after_the_prompt(i2i):
    image = Image.new("RGB", (512, 512), (200, 30, 30))
    text = i2i.prompt_template.format("make it blue")
    ids = i2i.tokenizer(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
    start = i2i.prompt_template_encode_start_idx
    assert i2i.tokenizer.tokenizer.decode(ids[start : start + 3]) == "make it blue"
    assert int((ids == i2i.tokenizer.image_token_id).sum()) == (504 // 28) ** 2  # 512 -> 504 px, 28 px per token


def test_clip_tokenizer_behaves_like_clip(t2i):
    tok = t2i.tokenizer_2
    enc = tok("A RED Fox, in the snow", max_length=77, padding="max_length", truncation=True)["input_ids"]
    assert enc == tok("a red fox, in the snow", max_length=77, padding="max_length", truncation=True)["input_ids"]
    assert len(enc) == 77 and enc[0] == tok.bos_token_id and tok.pad_token_id == tok.eos_token_id
    tokens = tok.convert_ids_to_tokens(enc)
    assert tokens[:8] == ["<|startoftext|>", "a</w>", "red</w>", "fox</w>", ",</w>", "in</w>", "the</w>", "snow</w>"]
    assert tokens[8:] == ["<|endoftext|>"] * 69
    long = tok(" ".join(["word"] * 200), max_length=77, padding="max_length", truncation=True)["input_ids"]
    assert len(long) == 77 and long[-1] == tok.eos_token_id
    assert tok.decode(enc, skip_special_tokens=True) == "a red fox , in the snow"


# --- behaviour -------------------------------------------------------------------------------------------------
def test_output_is_a_real_image_not_degenerate(base_cfg):
    assert base_cfg.shape == (1024, 1024, 3) and base_cfg.dtype == np.uint8
    assert 40 < base_cfg.mean() < 215 and base_cfg.std() > 15
    assert ((base_cfg == 0) | (base_cfg == 255)).mean() < 0.1


def test_positive_prompt_changes_the_image(t2i, base_cfg):
    assert diff(generate(t2i, "a blue car on a beach"), base_cfg) > MIN_DIFF
    assert diff(generate(t2i), base_cfg) == 0  # and the same request is reproducible


def test_negative_prompt_changes_the_image(t2i, base_cfg):
    assert diff(generate(t2i, negative_prompt="blurry, low quality"), base_cfg) > MIN_DIFF


def test_timestep_changes_the_image(t2i, base_nocfg):
    def frozen_time(module, args, kwargs):
        return args, {**kwargs, "timestep": torch.full_like(kwargs["timestep"], 500.0)}

    handle = t2i.transformer.register_forward_pre_hook(frozen_time, with_kwargs=True)
    try:
        assert diff(generate(t2i, guidance_scale=1.0), base_nocfg) > MIN_DIFF
    finally:
        handle.remove()


@pytest.mark.parametrize("block", range(4))
def test_each_visual_block_changes_the_image(t2i, base_nocfg, block):
    assert len(t2i.transformer.visual_transformer_blocks) == 4
    skip = t2i.transformer.visual_transformer_blocks[block].register_forward_hook(lambda m, args, out: args[0])
    try:
        assert diff(generate(t2i, guidance_scale=1.0), base_nocfg) > MIN_DIFF
    finally:
        skip.remove()


def test_lora_on_visual_attention_and_ffn_changes_the_image(built, base_nocfg):
    from diffusers import Kandinsky5T2IPipeline
    from peft import LoraConfig

    pipe = Kandinsky5T2IPipeline.from_pretrained(built["t2i"])  # own copy: adapters stay out of the shared one
    pipe.set_progress_bar_config(disable=True)
    targets = (
        r"visual_transformer_blocks\.\d+\."
        r"((self|cross)_attention\.(to_query|to_key|to_value|out_layer)|feed_forward\.(in_layer|out_layer))"
    )
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    lora_b = [p for n, p in pipe.transformer.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 * 10 and all(p.abs().sum() > 0 for p in lora_b)
    assert diff(generate(pipe, guidance_scale=1.0), base_nocfg) > MIN_DIFF
    pipe.transformer.disable_adapters()
    assert diff(generate(pipe, guidance_scale=1.0), base_nocfg) == 0


def test_i2i_generates_from_image_and_prompt(i2i):
    y, x = np.mgrid[0:1024, 0:1024] / 4
    source = Image.fromarray(np.stack([y, x, 255 - y], -1).astype(np.uint8))  # colour gradients
    base = generate(i2i, "make it blue", image=source, height=None, width=None)
    assert base.shape == (1024, 1024, 3) and base.std() > 15
    assert diff(generate(i2i, "add a hat", image=source, height=None, width=None), base) > MIN_DIFF
    flipped = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert diff(generate(i2i, "make it blue", image=flipped, height=None, width=None), base) > MIN_DIFF


def test_no_nan_with_cfg_10_over_50_steps(t2i):
    """The denoising loop of the pipeline, on the transformer alone at a small latent (fast), CFG 10, 50 steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cond = t2i.encode_prompt(PROMPT, device="cpu", dtype=torch.float32)
    uncond = t2i.encode_prompt("", device="cpu", dtype=torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(t2i.scheduler.config)
    scheduler.set_timesteps(50)
    latents = torch.randn(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    rope = [torch.arange(1), torch.arange(16), torch.arange(16)]

    def velocity(qwen, clip, cu, t):
        return t2i.transformer(
            hidden_states=latents, encoder_hidden_states=qwen, pooled_projections=clip, timestep=t.repeat(1),
            visual_rope_pos=rope, text_rope_pos=torch.arange(int(cu.diff().max())),
        ).sample

    with torch.no_grad():
        for t in scheduler.timesteps:
            v_c, v_u = velocity(*cond, t), velocity(*uncond, t)
            assert torch.isfinite(v_c).all() and torch.isfinite(v_u).all()
            latents = scheduler.step(v_u + 10.0 * (v_c - v_u), t, latents, return_dict=False)[0]
        assert torch.isfinite(latents).all() and latents.abs().max() < 100
        image = t2i.vae.decode(latents[:, 0].permute(0, 3, 1, 2) / t2i.vae.config.scaling_factor).sample
    assert torch.isfinite(image).all() and image.std() > 0.05
