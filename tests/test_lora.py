"""Per-request LoRA adapters (pipelines/lora.py) on the tiny Kandinsky 5 checkpoint.

LoRA files are made here with peft (random, non-zero B) and written in every accepted key layout; each must give the
same image as the diffusers/PEFT reference file, and "no LoRA" must give exactly the image of a pipeline that never
had one. Full generations are 1024x1024, 10 steps; cheaper checks run one transformer forward ("probe").
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from k5serve.pipelines.k5 import K5T2IPipeline
from k5serve.pipelines.lora import (
    LoraError,
    LoraManager,
    adapter_name_for,
    fold_scales,
    lora_target_modules,
    resolve_lora_file,
    to_diffusers_state_dict,
)
from k5serve.pipelines.worker import GenerationSpec
from k5serve.weights.tiny import ensure_tiny, make_transformer
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

SPEC = GenerationSpec("a red fox in the snow", "blurry", width=1024, height=1024, seed=1, steps=10)
BLOCKS = 4  # visual blocks of the tiny model
ATTN = [f"visual_transformer_blocks.{i}.{a}.{p}" for i in range(BLOCKS) for a in ("self_attention", "cross_attention")
        for p in ("to_query", "to_key", "to_value", "out_layer")]
FFN = [f"visual_transformer_blocks.{i}.feed_forward.{p}" for i in range(BLOCKS) for p in ("in_layer", "out_layer")]
W1, W2 = 0.5, 0.75  # weights of the two-LoRA request


def peft_lora(targets: list[str], seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Unprefixed PEFT state dict (`<module>.lora_A.weight`) of a random LoRA on a copy of the tiny transformer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False),
            make_transformer("t2i"))
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}


def split(sd: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) of an unprefixed PEFT state dict."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    return {m: (sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"]) for m in modules}


def image(out) -> np.ndarray:
    return np.asarray(out.images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = ensure_tiny(tmp_path_factory.mktemp("w"), "t2i")
    pipe = K5T2IPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.base_snapshot = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    return pipe


@pytest.fixture(scope="module")
def base(pipe) -> np.ndarray:
    """The image of a pipeline that has never had a LoRA (every LoRA-loading fixture depends on this one)."""
    assert not getattr(pipe.transformer, "peft_config", None)
    return image(pipe.generate(SPEC))


@pytest.fixture(scope="module")
def base_probe(pipe, base) -> torch.Tensor:
    return probe(pipe)


@torch.no_grad()
def probe(pipe) -> torch.Tensor:
    """One transformer forward on fixed random inputs (float output, much cheaper than a generation)."""
    g = torch.Generator().manual_seed(0)
    text_len = 8
    return pipe.transformer(
        hidden_states=torch.randn(1, 1, 16, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([600.0]),
        visual_rope_pos=[torch.arange(1), torch.arange(8), torch.arange(8)],
        text_rope_pos=torch.arange(text_len),
        scale_factor=[1.0, 1.0, 1.0],
        sparse_params=None,
        return_dict=True,
    ).sample


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """The LoRA folder with one file per key layout and the odd cases; returns (folder, lora1, lora2)."""
    d = tmp_path_factory.mktemp("loras")
    lora1 = peft_lora(ATTN + FFN, seed=10)  # all visual attention + FFN layers
    lora2 = peft_lora([n for n in ATTN if "self_attention" in n] + FFN, seed=11)

    def save(name, sd, metadata=None):
        save_file(sd, str(d / f"{name}.safetensors"), metadata=metadata)

    save("peft", {f"transformer.{k}": v for k, v in lora1.items()})  # the reference: diffusers/PEFT, prefixed
    save("peft_noprefix", lora1)
    save("old_diffusers", {f"transformer.{m}.lora.{s}.weight": t for m, (a, b) in split(lora1).items()
                           for s, t in (("down", a), ("up", b))})
    save("official", {f"base_model.model.{m}.lora_{s}.default.weight": t for m, (a, b) in split(lora1).items()
                      for s, t in (("A", a), ("B", b))})
    kohya = {}
    for m, (a, b) in split(lora1).items():  # alpha = rank/2, i.e. scale 0.5, so up = 2*B gives the same LoRA
        k = "lora_unet_" + m.replace(".", "_")
        kohya |= {f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b * 2, f"{k}.alpha": torch.tensor(2.0)}
    save("kohya", kohya)
    save("second", {f"transformer.{k}": v for k, v in lora2.items()})
    # W1*lora1 + W2*lora2 as one rank-8 LoRA: what set_adapters([1, 2], [W1, W2]) computes.
    s1, s2, combined = split(lora1), split(lora2), {}
    for m in s1:
        a, b = s1[m]
        b = b * W1
        if m in s2:
            a, b = torch.cat([a, s2[m][0]], 0), torch.cat([b, s2[m][1] * W2], 1)
        combined |= {f"transformer.{m}.lora_A.weight": a, f"transformer.{m}.lora_B.weight": b.contiguous()}
    save("combined", combined)
    shutil.copy(d / "peft.safetensors", d / "civitai:123@456.safetensors")
    shutil.copy(d / "second.safetensors", d / "runware:lora@1.safetensors")
    for name, src in (("lru-a", "peft"), ("lru-b", "second"), ("lru-c", "kohya")):
        shutil.copy(d / f"{src}.safetensors", d / f"{name}.safetensors")
    save("unrelated", {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 8),
                       "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, 4),
                       "transformer.no_such_block.lora_A.weight": torch.ones(4, 32),
                       "transformer.no_such_block.lora_B.weight": torch.ones(32, 4)})
    bigger = {f"transformer.{ATTN[0]}.lora_A.weight": torch.ones(4, 64),
              f"transformer.{ATTN[0]}.lora_B.weight": torch.ones(64, 4)}
    save("other_model", bigger)  # e.g. a LoRA for a wider model
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors file")
    (d / "inside-link.safetensors").symlink_to(d / "peft.safetensors")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(d / "peft.safetensors", outside / "secret.safetensors")
    (d / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    return d, lora1, lora2


@pytest.fixture(scope="module")
def manager(pipe, base, loras) -> LoraManager:
    return LoraManager(pipe, loras[0], max_loaded=8)


def generate(pipe, manager, request) -> np.ndarray:
    manager.apply(request)
    return image(pipe.generate(SPEC))


@pytest.fixture(scope="module")
def reference(pipe, manager) -> np.ndarray:
    return generate(pipe, manager, [("peft", 1.0)])


@pytest.fixture(scope="module")
def reference_probe(pipe, manager, reference) -> torch.Tensor:
    manager.apply([("peft", 1.0)])
    return probe(pipe)


def differs(a: np.ndarray, b: np.ndarray, min_mean: float = 1.0) -> bool:
    return float(np.abs(a - b).mean()) > min_mean


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------
def test_reference_lora_changes_the_image(pipe, manager, base, reference):
    assert differs(reference, base)
    assert manager.active == {"peft": 1.0}
    assert manager.last_load_seconds > 0 and manager.last_switch_seconds > 0


@pytest.mark.parametrize("fmt", ["peft_noprefix", "old_diffusers", "official", "kohya"])
def test_every_key_format_gives_the_reference_image(pipe, manager, base, reference, reference_probe, fmt):
    out = generate(pipe, manager, [(fmt, 1.0)])
    assert manager.last_loaded == [fmt]
    # Same tensors after renaming (kohya: up = 2B folded with alpha/rank = 0.5, exact in binary): bit-identical.
    assert np.array_equal(out, reference)
    assert differs(out, base)
    torch.testing.assert_close(probe(pipe), reference_probe, rtol=0, atol=0)


def test_keys_of_each_format_are_normalised(loras):
    d, lora1, _ = loras
    modules = lora_target_modules(make_transformer("t2i"))
    expected = {f"transformer.{k}" for k in lora1}
    from safetensors.torch import load_file

    for fmt in ("peft", "peft_noprefix", "old_diffusers", "official", "kohya"):
        sd, scales = to_diffusers_state_dict(load_file(d / f"{fmt}.safetensors"), modules, name=fmt)
        assert set(sd) == expected, fmt
        assert scales == ({m: 0.5 for m in ATTN + FFN} if fmt == "kohya" else {}), fmt
    # ComfyUI-style (diffusion_model. prefix, lora_down/up) and old diffusers without the prefix
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    for down, up in (("diffusion_model.{}.lora_down.weight", "diffusion_model.{}.lora_up.weight"),
                     ("{}.lora.down.weight", "{}.lora.up.weight")):
        sd, scales = to_diffusers_state_dict({down.format(ATTN[0]): a, up.format(ATTN[0]): b}, modules)
        assert sd == {f"transformer.{ATTN[0]}.lora_A.weight": a, f"transformer.{ATTN[0]}.lora_B.weight": b}


def test_alpha_and_metadata_scales_are_folded_into_b():
    modules = lora_target_modules(make_transformer("t2i"))
    m = ATTN[0]
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    k = "lora_unet_" + m.replace(".", "_")
    sd, scales = to_diffusers_state_dict({f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b,
                                          f"{k}.alpha": torch.tensor(3.0)}, modules)
    assert scales == {m: 0.75}
    folded = fold_scales(sd, scales)
    torch.testing.assert_close(folded[f"transformer.{m}.lora_B.weight"], b * 0.75)
    assert folded[f"transformer.{m}.lora_A.weight"] is a
    # diffusers' adapter metadata in the safetensors header (LoraConfig kwargs, "transformer."-prefixed)
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {ATTN[1]: 2}}
    peft_sd = {f"{n}.lora_A.weight": a for n in ATTN[:3]} | {f"{n}.lora_B.weight": b for n in ATTN[:3]}
    _, scales = to_diffusers_state_dict(peft_sd, modules, metadata=meta)
    assert scales == {ATTN[0]: 2.0, ATTN[1]: 0.5, ATTN[2]: 2.0}


def test_partial_match_loads_what_matches_and_warns(caplog):
    modules = lora_target_modules(make_transformer("t2i"))
    sd = {f"transformer.{ATTN[0]}.lora_A.weight": torch.randn(4, 32),
          f"transformer.{ATTN[0]}.lora_B.weight": torch.randn(32, 4),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 8),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 4),
          f"transformer.{ATTN[1]}.lora_A.weight": torch.randn(4, 32)}  # B missing
    with caplog.at_level(logging.WARNING, logger="k5serve.lora"):
        out, _ = to_diffusers_state_dict(sd, modules, name="partial")
    assert set(out) == {f"transformer.{ATTN[0]}.lora_A.weight", f"transformer.{ATTN[0]}.lora_B.weight"}
    assert "3 of 5 keys match no layer" in caplog.text


def test_file_matching_no_layer_is_an_error(pipe, manager, loras):
    before = set(pipe.transformer.peft_config) if getattr(pipe.transformer, "peft_config", None) else set()
    with pytest.raises(LoraError, match="'unrelated' matches no layer of this model"):
        manager.apply([("unrelated", 1.0)])
    with pytest.raises(LoraError, match="'other_model' does not fit this model"):
        manager.apply([("other_model", 1.0)])
    with pytest.raises(LoraError, match="'garbage' is not a readable safetensors file"):
        manager.apply([("garbage", 1.0)])
    after = set(pipe.transformer.peft_config) if getattr(pipe.transformer, "peft_config", None) else set()
    assert after == before and manager.active == {}
    with pytest.raises(LoraError, match="DoRA"):
        to_diffusers_state_dict({f"transformer.{ATTN[0]}.lora_magnitude_vector": torch.ones(32)}, set(ATTN))


# ---------------------------------------------------------------------------------------------------------------
# Weights, combinations and the exact base model
# ---------------------------------------------------------------------------------------------------------------
def test_weight_zero_is_exactly_base(pipe, manager, base, reference):
    assert np.array_equal(generate(pipe, manager, [("peft", 0.0)]), base)
    assert manager.active == {}


def test_no_lora_after_a_lora_is_exactly_base(pipe, manager, base, reference):
    manager.apply([("peft", 1.0), ("kohya", -0.5)])
    assert np.array_equal(generate(pipe, manager, []), base)
    # the base weights were never touched
    state = pipe.transformer.state_dict()
    for key, value in pipe.base_snapshot.items():
        wrapped = key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
        assert torch.equal(state.get(key, state.get(wrapped)), value), key


def test_two_loras_are_the_weighted_sum(pipe, manager, base, reference, base_probe):
    second = generate(pipe, manager, [("second", 1.0)])
    both = generate(pipe, manager, [("peft", W1), ("second", W2)])
    assert manager.active == {"peft": W1, "second": W2}
    both_probe = probe(pipe)
    for other in (base, reference, second):
        assert differs(both, other)
    combined = generate(pipe, manager, [("combined", 1.0)])
    assert np.abs(combined - both).max() <= 1
    torch.testing.assert_close(probe(pipe), both_probe, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both_probe, base_probe)


def test_negative_weight(pipe, manager, base, reference):
    negative = generate(pipe, manager, [("peft", -1.0)])
    assert differs(negative, reference) and differs(negative, base)


def test_same_lora_twice_adds_weights(pipe, manager, reference_probe):
    manager.apply([("peft", 0.25), ("peft", 0.75)])
    assert manager.active == {"peft": 1.0}
    torch.testing.assert_close(probe(pipe), reference_probe)


def test_air_ids(pipe, manager, loras, reference_probe):
    manager.apply([("civitai:123@456", 1.0)])
    torch.testing.assert_close(probe(pipe), reference_probe, rtol=0, atol=0)
    manager.apply([("runware:lora@1", 1.0), ("civitai:123@456", 0.5)])
    name = manager.adapter_name("civitai:123@456")
    assert name and "." not in name and name != adapter_name_for("civitai_123_456")
    assert resolve_lora_file(loras[0], "runware:lora@1").name == "runware:lora@1.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Cache (LRU)
# ---------------------------------------------------------------------------------------------------------------
def test_lru_eviction(pipe, base, loras, reference_probe, base_probe):
    lru = LoraManager(pipe, loras[0], max_loaded=2)
    try:
        lru.apply([("lru-a", 1.0)])
        lru.apply([("lru-b", 1.0)])
        assert lru.loaded == ["lru-a", "lru-b"]
        lru.apply([("lru-a", 1.0)])  # a is now the most recent
        assert lru.last_loaded == [] and lru.loaded == ["lru-b", "lru-a"]
        lru.apply([("lru-c", 1.0)])  # evicts b, the least recently used
        assert lru.last_evicted == ["lru-b"] and lru.loaded == ["lru-a", "lru-c"]
        adapters = set(pipe.get_list_adapters()["transformer"])
        assert adapter_name_for("lru-b") not in adapters
        assert {adapter_name_for("lru-a"), adapter_name_for("lru-c")} <= adapters
        lru.apply([("lru-b", 1.0), ("lru-c", 1.0)])  # evicts a, never c (in the request)
        assert lru.last_evicted == ["lru-a"] and lru.last_loaded == ["lru-b"]
        lru.apply([("lru-a", 1.0), ("lru-b", 1.0), ("lru-c", 1.0)])  # more than fit: all stay for this request
        assert set(lru.loaded) == {"lru-a", "lru-b", "lru-c"} and lru.active == {"lru-a": 1, "lru-b": 1, "lru-c": 1}
        lru.apply([("lru-a", 1.0)])  # back under the limit; reloaded a still gives the reference
        assert len(lru.loaded) == 2 and "lru-a" in lru.loaded
        torch.testing.assert_close(probe(pipe), reference_probe, rtol=0, atol=0)
    finally:
        lru.unload_all()
    left = set(pipe.get_list_adapters()["transformer"])
    assert not {adapter_name_for(m) for m in ("lru-a", "lru-b", "lru-c")} & left
    torch.testing.assert_close(probe(pipe), base_probe, rtol=0, atol=0)


def test_changed_file_is_reloaded(pipe, base, loras, base_probe):
    d = loras[0]
    shutil.copy(d / "peft.safetensors", d / "mutable.safetensors")
    m = LoraManager(pipe, d)
    try:
        m.apply([("mutable", 1.0)])
        first = probe(pipe)
        shutil.copy(d / "second.safetensors", d / "mutable.safetensors")
        os.utime(d / "mutable.safetensors", ns=(1, 1))
        m.apply([("mutable", 1.0)])
        assert m.last_loaded == ["mutable"]
        assert not torch.allclose(probe(pipe), first)
    finally:
        m.unload_all()
        (d / "mutable.safetensors").unlink()


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", ["../x", "/etc/passwd", "a/b", "..", ".", ".hidden", "x\x00y", "a\\b", "",
                                      "../loras/peft", "x\ny", "a" * 300])
def test_path_escapes_are_refused(loras, manager, model_id):
    with pytest.raises(LoraError, match="not a valid LoRA model id"):
        resolve_lora_file(loras[0], model_id)
    with pytest.raises(LoraError):
        manager.apply([(model_id, 1.0)])


def test_symlinks(loras):
    d = loras[0]
    with pytest.raises(LoraError, match="'escape' .*outside the LoRA folder"):
        resolve_lora_file(d, "escape")
    assert resolve_lora_file(d, "inside-link") == (d / "peft.safetensors").resolve()


def test_missing_file_names_the_model(loras, manager):
    with pytest.raises(LoraError, match=r"'civitai:999@1' not found"):
        resolve_lora_file(loras[0], "civitai:999@1")
    with pytest.raises(LoraError, match=r"'nope' not found"):
        manager.apply([("peft", 1.0), ("nope", 1.0)])
    assert manager.active == {}  # a failed request leaves the base model active


def test_no_lora_dir():
    class _Pipe:
        transformer = None

    with pytest.raises(LoraError, match="not enabled"):
        LoraManager(_Pipe(), None).apply([("peft", 1.0)])
    LoraManager(_Pipe(), None).apply([])  # nothing to do


def test_metadata_in_file_header(pipe, base, loras, reference_probe):
    """A diffusers-saved file whose header says lora_alpha = 2 * r: B is scaled by 2 before loading."""
    d, lora1, _ = loras
    half = {f"transformer.{k}": (v / 2 if ".lora_B." in k else v) for k, v in lora1.items()}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})}
    save_file(half, str(d / "with-metadata.safetensors"), metadata=meta)
    m = LoraManager(pipe, d)
    try:
        m.apply([("with-metadata", 1.0)])
        torch.testing.assert_close(probe(pipe), reference_probe, rtol=0, atol=0)
    finally:
        m.unload_all()
