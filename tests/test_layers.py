"""Design rules that keep the layers honest, and the worker on its own (real pipeline, tiny weights)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT
from k5serve.pipelines.schedulers import SCHEDULER_NAMES as PIPELINE_SCHEDULERS
from k5serve.server.protocol import SCHEDULER_NAMES as CONTRACT_SCHEDULERS

# package -> packages it must never import
FORBIDDEN = {
    "pipelines": {"server"},
    "accel": {"server", "pipelines"},
    "weights": {"server", "pipelines", "accel"},
}
TORCH_FREE = ["server/protocol.py", "server/validation.py", "server/http.py", "server/store.py", "server/auth.py"]


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        assert not imported_packages(path) & FORBIDDEN[package], path


@pytest.mark.parametrize("module", TORCH_FREE)
def test_transport_and_protocol_know_nothing_about_torch(module):
    assert not imported_packages(ROOT / module) & {"torch", "diffusers", "transformers"}


def test_the_serving_layer_loads_no_torch():
    """In a fresh interpreter, importing every module under server/ (the front-end, transports, dispatcher,
    CLI) loads none of the GPU stack: a front-end that only routes tasks starts in well under a second."""
    import subprocess
    import sys

    modules = sorted(f"k5serve.server.{p.stem}" for p in (ROOT / "server").glob("*.py") if p.stem != "__init__")
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'cache_dit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_contract_scheduler_names_are_all_mapped():
    assert tuple(CONTRACT_SCHEDULERS) == tuple(PIPELINE_SCHEDULERS)


def test_failed_generation_fails_its_job_only(data_dir):
    from k5serve.pipelines.engine import K5Engine
    from k5serve.pipelines.loader import LoadConfig, load_t2i
    from k5serve.pipelines.spec import GenerationSpec
    from k5serve.pipelines.worker import GenerationError, LocalWorker
    from k5serve.weights.tiny import ensure_tiny

    pipe, info = load_t2i(LoadConfig(ensure_tiny(data_dir / "tiny"), "cpu"))
    worker = LocalWorker(K5Engine(pipe), max_queue=4, info=info)
    try:
        # The worker trusts its input; a size the model cannot patchify fails inside the real pipeline.
        broken = worker.submit(GenerationSpec("a cat", "", width=1000, height=1000, seed=1, steps=10))
        fine = worker.submit(GenerationSpec("a cat", "", width=1024, height=1024, seed=1, steps=10))
        with pytest.raises(GenerationError) as exc:
            broken.result(timeout=300)
        assert str(exc.value)
        output = fine.result(timeout=300)
        assert len(output.images) == 1 and output.images[0].size == (1024, 1024)
        assert len(output.step_seconds) == 10 and output.seconds > 0
        assert worker.alive and worker.queue_depth == 0
    finally:
        worker.close()
    assert not worker.alive


def test_editing_pipeline_shares_encoders_and_vae_with_t2i(data_dir):
    from k5serve.pipelines.engine import EngineConfig, K5Engine
    from k5serve.pipelines.loader import LoadConfig, load_t2i
    from k5serve.weights.tiny import ensure_tiny

    pipe, _ = load_t2i(LoadConfig(ensure_tiny(data_dir / "tiny", "t2i"), "cpu"))
    engine = K5Engine(pipe, EngineConfig(i2i_path=ensure_tiny(data_dir / "tiny", "i2i"), i2i_load="eager"))
    i2i = engine.i2i()
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        assert getattr(i2i, name) is getattr(pipe, name), name
    assert i2i.transformer is not pipe.transformer and i2i.transformer.config.visual_cond
    assert engine.describe()["i2i_loaded"] is True


def test_pyflakes_clean():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "ruff", "check", "server", "pipelines", "accel", "weights",
                          "benchmarks", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
