"""Speed options on the CPU (pipelines/speed.py, pipelines/prompt_cache.py): the real pipeline on tiny weights,
the real server, the real CLI, and the GPU benchmark's own script in its CPU mode.

Tolerances: eager float32 on the CPU is deterministic, so the prompt cache must give byte-identical images.
Compiled blocks (inductor) reorder float arithmetic: their images must stay within 1 of 255 on average
(measured: at most 1 on any pixel). FP8 weight storage rounds every weight to 3 mantissa bits: within 6 on
average (measured 2.2). SDPA's math kernel against its default one: within 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from conftest import ROOT, RunningServer, own_data_dir, task
from k5serve.pipelines.config import EngineConfig, LoadConfig, SpeedSettings
from k5serve.pipelines.loader import load_engine
from k5serve.pipelines.prompt_cache import PromptCache
from k5serve.pipelines.speed import SpeedOptionError, check_speed
from k5serve.pipelines.worker import GenerationSpec
from k5serve.weights.tiny import ensure_tiny
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file
from test_http_api import only_item
from test_image_inputs import data_uri, encoded, pixels_of
from test_lora import ATTN, peft_lora

SPEC = GenerationSpec("a red fox in the snow", "blurry", width=1024, height=1024, seed=3, steps=4,
                      guidance_scale=5.0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(data_dir):
    return ensure_tiny(data_dir / "tiny", "t2i")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speed-loras")
    save_file(peft_lora(ATTN, seed=3), folder / "style.safetensors")
    return folder


def engine(path, lora_dir=None, **speed):
    return load_engine(LoadConfig(path, device="cpu"), EngineConfig(lora_dir=lora_dir,
                                                                   speed=SpeedSettings(**speed)))[0]


def pixels(output) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in output.images])


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


# ---------------------------------------------------------------------------------------------- prompt cache


def test_the_prompt_cache_gives_the_same_bytes_and_a_hit_runs_no_text_encoder(tiny):
    plain = engine(tiny, prompt_cache=0).generate(SPEC)
    cached = engine(tiny)
    calls = {"qwen": 0, "clip": 0}
    cached.t2i.text_encoder.register_forward_pre_hook(lambda *_: calls.__setitem__("qwen", calls["qwen"] + 1))
    cached.t2i.text_encoder_2.register_forward_pre_hook(lambda *_: calls.__setitem__("clip", calls["clip"] + 1))

    first = cached.generate(SPEC)
    assert plain.prompt_cache == first.prompt_cache == {"hits": 0, "misses": 2}
    assert calls["qwen"] > 0 and calls["clip"] > 0
    calls.update(qwen=0, clip=0)
    second = cached.generate(SPEC)
    assert second.prompt_cache == {"hits": 2, "misses": 0}
    assert calls == {"qwen": 0, "clip": 0}  # under --offload model nothing would move the encoders to the GPU
    assert np.array_equal(pixels(plain), pixels(first)) and np.array_equal(pixels(first), pixels(second))

    other = cached.generate(replace(SPEC, prompt="a lighthouse in a storm"))  # the negative prompt is shared
    assert other.prompt_cache == {"hits": 1, "misses": 1}
    assert calls["qwen"] == 1
    assert cached.describe()["prompt_cache_entries"] == 3

    # numberResults: the one-image entries are repeated, as encode_prompt(num_images_per_prompt=2) would
    two = replace(SPEC, num_images=2)
    repeated = cached.generate(two)
    assert repeated.prompt_cache == {"hits": 2, "misses": 0} and calls["qwen"] == 1
    assert np.array_equal(pixels(repeated), pixels(engine(tiny, prompt_cache=0).generate(two)))


def test_the_prompt_cache_is_bounded_and_keeps_the_recent_entries():
    cache = PromptCache(2)
    encoded = []

    def get(key):
        return cache.get((key,), lambda: encoded.append(key) or key.upper())

    assert get("a") == ("A", False) and get("b") == ("B", False)
    assert get("a") == ("A", True)  # a is now the most recent
    get("c")  # evicts b
    assert len(cache) == 2 and get("a")[1] and not get("b")[1]
    assert (cache.hits, cache.misses) == (2, 4)
    off = PromptCache(0)
    assert off.get(("a",), lambda: 1) == (1, False) and off.get(("a",), lambda: 2) == (2, False) and len(off) == 0
    with pytest.raises(ValueError):
        PromptCache(-1)


# ---------------------------------------------------------------------------------------------- other options


def test_fp8_storage_halves_the_weights_keeps_the_image_close_and_lora_working(tiny, lora_dir):
    reference = engine(tiny, prompt_cache=0)
    stored = engine(tiny, lora_dir=lora_dir, fp8_storage=True)

    def weight_bytes(e):
        return sum(p.numel() * p.element_size() for p in e.t2i.transformer.parameters())

    block = stored.t2i.transformer.visual_transformer_blocks[0]
    assert block.feed_forward.in_layer.weight.dtype == torch.float8_e4m3fn
    # A quarter of float32 in the blocks; the tiny model's embeddings, norms and modulation (kept as they are)
    # are a larger share than in the full one, where the blocks hold 97% of the weights.
    assert weight_bytes(stored) < 0.6 * weight_bytes(reference)
    assert stored.t2i.transformer.dtype == torch.float32  # the compute dtype: latents are not cast to FP8
    base = pixels(reference.generate(SPEC))
    fp8 = pixels(stored.generate(SPEC))
    assert 0 < mae(fp8, base) < 6
    with_lora = pixels(stored.generate(replace(SPEC, loras=(("style", 1.0),))))
    assert mae(with_lora, fp8) > 1  # the adapter still changes the image


def test_an_attention_backend_is_selected_through_the_dispatcher(tiny):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    def backends(e):
        return {type(m.processor).__name__: m.processor._attention_backend
                for m in e.t2i.transformer.modules() if hasattr(m, "processor")}

    default = _AttentionBackendRegistry._active_backend
    native = engine(tiny)
    math = engine(tiny, attention_backend="math")
    assert backends(math) == {"Kandinsky5AttnProcessor": "_native_math"}
    # diffusers also makes it the process-wide default; the option stays with its own model
    assert _AttentionBackendRegistry._active_backend == default
    assert backends(engine(tiny)) == backends(native) == {"Kandinsky5AttnProcessor": None}
    assert mae(pixels(math.generate(SPEC)), pixels(native.generate(SPEC))) < 1


@pytest.mark.parametrize(("settings", "message"), [
    (SpeedSettings(quantize="fp8"), "compute capability 8.9 or higher"),
    (SpeedSettings(quantize="fp8", fp8_storage=True), "drop --fp8-storage"),
    (SpeedSettings(attention_backend="cudnn"), "--attention-backend cudnn needs a CUDA GPU"),
    (SpeedSettings(attention_backend="flash3"), "needs a CUDA GPU"),
    (SpeedSettings(attention_backend="nope"), "choose from native, math"),
    (SpeedSettings(prompt_cache=-1), "--prompt-cache"),
])
def test_what_the_cpu_cannot_do_is_refused_by_name(settings, message):
    with pytest.raises(SpeedOptionError, match=message):
        check_speed(settings, CPU)
    check_speed(SpeedSettings(compile=True, fp8_storage=True, attention_backend="math"), CPU)  # these it can


@pytest.mark.parametrize(("flags", "message", "code"), [
    (["--quantize", "fp8"], "error: --quantize fp8 needs FP8 matrix units", 1),
    (["--attention-backend", "sage"], "error: --attention-backend sage needs a CUDA GPU", 1),
    (["--attention-backend", "fast"], "invalid choice: 'fast'", 2),
    (["--prompt-cache", "-1"], "must be 0 or more", 2),
])
def test_the_server_refuses_them_at_start_up(tmp_path_factory, data_dir, flags, message, code):
    own = own_data_dir(tmp_path_factory, data_dir, "refused")
    proc = subprocess.run([sys.executable, "-m", "k5serve.server.cli", "--log-format", "text", "serve", "--tiny",
                           "--port", str(free_port()), "--data-dir", str(own), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Uvicorn running" not in proc.stderr


# ---------------------------------------------------------------------------------------------- compiled blocks


def test_compiled_blocks_recompile_for_a_new_adapter_set_only_never_for_a_weight(tiny, lora_dir):
    """A LoRA weight change reuses the compiled blocks; a new set of active adapters compiles once, and the
    blocks stay compiled past dynamo's default limit of 8 variants (peft flipping requires_grad used to use
    them up: every switch recompiled)."""
    from torch._dynamo.utils import counters

    compiled = engine(tiny, lora_dir=lora_dir, compile=True)
    assert torch._dynamo.config.recompile_limit >= 64
    quick = replace(SPEC, steps=2, width=1024, height=1024)

    def graphs(spec):
        compiled.generate(spec)
        return counters["stats"]["unique_graphs"]

    base = graphs(quick)
    styled = graphs(replace(quick, loras=(("style", 1.0),)))
    assert styled > base  # peft's layers replace the Linear ones: compiled once more
    assert graphs(replace(quick, loras=(("style", 0.4),))) == styled  # a weight is not a new graph
    assert graphs(replace(quick, loras=(("style", 1.7),))) == styled
    off = graphs(quick)  # adapters disabled: one more variant, then reused
    assert graphs(replace(quick, loras=(("style", 0.9),))) == graphs(quick) == off
    assert not any(p.requires_grad for p in compiled.t2i.transformer.parameters())


# ---------------------------------------------------------------------------------------------- compiled server


def test_a_compiled_server_warms_up_before_ready_and_keeps_step_caching_and_lora(tmp_path_factory, data_dir,
                                                                               lora_dir, start_server):
    compiled = RunningServer(own_data_dir(tmp_path_factory, data_dir, "compiled"), "--compile", "--warmup",
                             "--i2i-load", "eager", "--lora-dir", str(lora_dir), ready=False)
    try:
        seen = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            answer = httpx.get(compiled.url + "/ready", timeout=5)
            seen.append((answer.status_code, answer.text))
            if answer.status_code == 200 or "loading failed" in answer.text:
                break
            time.sleep(0.5)
        assert seen[-1][0] == 200, compiled.log()[-3000:]
        assert any(code == 503 and "warming up: " in text for code, text in seen), seen[:3]
        assert "warmed up 7 sizes" in compiled.log()
        assert "warmed up 7 editing" in compiled.log()  # the eagerly loaded editing model too

        eager = start_server("--lora-dir", str(lora_dir))
        reference = data_uri(encoded((1024, 1024)))
        requests = {
            "plain": {},
            "teaCache": {"acceleratorOptions": {"teaCache": True, "teaCacheDistance": 1.0}},
            "lora": {"lora": [{"model": "style", "weight": 1.0}]},
            "edit": {"positivePrompt": "make it night", "inputs": {"referenceImages": [reference]}},
        }
        images = {}
        for name, fields in requests.items():
            body = [task(outputType="base64Data", outputFormat="PNG", CFGScale=4.0, **fields)]
            images[name] = (pixels_of(only_item(compiled.post(body))), pixels_of(only_item(eager.post(body))))
        for name, (fast, reference) in images.items():
            assert mae(fast, reference) < 1, name
        assert mae(images["lora"][0], images["plain"][0]) > 1
        samples = {(family.name, tuple(sorted(sample.labels.items()))): sample.value
                   for family in text_string_to_metric_families(httpx.get(compiled.url + "/metrics").text)
                   for sample in family.samples if sample.name.endswith("_total")}
        skipped = sum(value for (name, labels), value in samples.items() if name == "k5serve_transformer_passes"
                      and ("cache", "teacache") in labels and ("outcome", "skipped") in labels)
        assert skipped > 0  # the step cache still skips passes on the compiled blocks
        assert samples[("k5serve_prompt_cache", (("outcome", "hit"),))] >= 3  # the negative prompt, encoded once
    finally:
        compiled.stop()


# ---------------------------------------------------------------------------------------------- the benchmark


def test_the_gpu_benchmark_script_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/gpu/run.sh --tiny: the same script a GPU machine runs (with no wheels to install here)."""
    out = tmp_path / "out"
    proc = subprocess.run([str(ROOT / "benchmarks/gpu/run.sh"), str(out), "--tiny", "--steps", "2", "--runs", "1"],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHON=sys.executable, K5_WHEELS=str(tmp_path / "no-wheels")))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = (out / "table.md").read_text()
    results = json.loads((out / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert {"stock diffusers", "engine", "prompt cache", "compile", "fp8 storage", "all + teacache",
            "all + fbcache", "all + dbcache"} <= set(rows)
    for name in ("stock diffusers", "engine", "compile", "all + teacache"):
        assert rows[name]["median_seconds"] > 0 and rows[name]["pass_ms"] > 0, name
    assert "compute capability 8.9" in rows["fp8"]["skipped"]
    assert results["tflop_per_pass"] > 0
    assert rows["engine"]["psnr"] == float("inf") or rows["engine"]["psnr"] == "inf"
    assert "| stock diffusers |" in table and "| fp8 | not run:" in table
    assert (out / "versions.txt").read_text().startswith("python ")


def test_the_benchmark_uses_the_model_pages_cache_defaults():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu
    from k5serve.server.protocol.models import AcceleratorOptions

    fields = AcceleratorOptions.model_fields
    assert bench_gpu.PAGE_CACHE_DEFAULTS == {"teacache": fields["teaCacheDistance"].default,
                                             "fbcache": fields["fbCacheThreshold"].default,
                                             "dbcache": fields["dbCacheThreshold"].default}
    assert bench_gpu.PAGE_MAX_CONSECUTIVE == fields["cacheMaxConsecutiveSteps"].default
