"""Design rules that keep the layers honest, and the worker on its own (real pipeline, tiny weights)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT
from k5serve.pipelines.schedulers import SCHEDULER_NAMES as PIPELINE_SCHEDULERS
from k5serve.server.protocol.models import SCHEDULER_NAMES as CONTRACT_SCHEDULERS

# The package's layers, lowest first: a module may import its own layer and the layers below, never above.
# accel and weights are peers that know nothing of each other. k5serve/ itself (the version, the log task
# context) sits below everything; `python -m k5serve` (k5serve/__main__.py) is the entry point, above it all.
LAYERS = {"k5serve": 0, "k5serve.accel": 1, "k5serve.weights": 1, "k5serve.pipelines": 2, "k5serve.server": 3,
          "k5serve.__main__": 4}
FOLDERS = {"k5serve": "k5serve", "k5serve.server": "server", "k5serve.pipelines": "pipelines",
           "k5serve.accel": "accel", "k5serve.weights": "weights"}
GPU_STACK = ("torch", "diffusers", "transformers", "peft", "cache_dit", "ray")  # ray: only with --workers ray


# Inside the server, its sub-packages by concern, lowest first: each may import its own sub-package and those
# ranked below it, never one ranked the same or above. The modules at the top of server/ (app, cli, options,
# background) assemble the rest; config and tenants (settings, the latter re-read while serving) sit below
# everything.
SERVER_PARTS = {"k5serve.server.config": 0, "k5serve.server.tenants": 0, "k5serve.server.protocol": 1,
                "k5serve.server.store": 2, "k5serve.server.ops": 3, "k5serve.server.outbound": 3,
                "k5serve.server.tasks": 4, "k5serve.server.transport": 5, "k5serve.server": 6}


def package_modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name, from the folders that hold it (sub-packages
    included: k5serve.server.tasks.dispatcher is server/tasks/dispatcher.py)."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file: at the top, inside functions, under
    TYPE_CHECKING; relative imports resolved; `from pkg import module` counted as importing the module."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def layer_of(module: str) -> str:
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)


def test_the_import_graph_reads_the_whole_package():
    graph = import_graph()
    assert {"k5serve.server.app", "k5serve.pipelines.engine", "k5serve.accel.hooks",
            "k5serve.weights.tiny"} <= set(graph)
    assert "k5serve.pipelines.loader" in graph["k5serve.pipelines.engine"] or \
        "k5serve.pipelines.engine" in graph["k5serve.pipelines.loader"]  # the walker sees imports at all
    assert "k5serve.pipelines.lora" in graph["k5serve.pipelines.engine"]  # ... and function-level ones


def test_imports_flow_one_way():
    """server -> pipelines -> accel / weights, nothing back up, no arrow between accel and weights."""
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            a, b = layer_of(module), layer_of(target)
            if a != b and (LAYERS[b] >= LAYERS[a]):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def server_part(module: str) -> str:
    return max((part for part in SERVER_PARTS if module == part or module.startswith(part + ".")), key=len)


def test_the_server_has_sub_packages_by_concern():
    """server/ is sub-packages by concern; at its top only the modules that assemble them, and the settings."""
    modules = package_modules()
    assert {"k5serve.server.protocol.models", "k5serve.server.store.task_records", "k5serve.server.outbound.outbox",
            "k5serve.server.ops.metrics", "k5serve.server.tasks.image_inference", "k5serve.server.tasks.get_response",
            "k5serve.server.tasks.image_upload", "k5serve.server.tasks.model_search",
            "k5serve.server.transport.http", "k5serve.server.transport.ws"} <= set(modules)
    top = sorted(m.rpartition(".")[2] for m in modules if m.count(".") == 2 and m.startswith("k5serve.server.")
                 and not (ROOT / "server" / m.rpartition(".")[2]).is_dir())
    assert top == ["app", "background", "cli", "config", "options", "tenants"], top
    for package in {m.rsplit(".", 1)[0] for m in modules if m.startswith("k5serve.server.")}:
        assert package in modules, f"{package} has no __init__.py"


def test_server_sub_packages_import_downward_only():
    """protocol -> store -> ops / outbound -> tasks -> transport -> app, cli: nothing from a sub-package up into
    one ranked the same or higher (ops and outbound know nothing of each other)."""
    upward = []
    for module, targets in import_graph().items():
        if not module.startswith("k5serve.server"):
            continue
        for target in targets:
            if not target.startswith("k5serve.server"):
                continue
            a, b = server_part(module), server_part(target)
            if a != b and SERVER_PARTS[b] >= SERVER_PARTS[a]:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_functions_stay_small_and_endpoints_read_typed_parts():
    """No function in server/ or pipelines/ over 80 lines; only transport/parts.py (and app.py, which stores
    them) touch app.state: every endpoint reads the app's parts through `parts(request)`, typed."""
    long, untyped = [], []
    for folder in ("server", "pipelines"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
            if ".state." in source.replace("self.state.", "").replace("slot.state", "") and \
                    path.relative_to(ROOT).as_posix() not in ("server/transport/parts.py", "server/app.py"):
                untyped.append(str(path.relative_to(ROOT)))
    assert not long, long
    assert not untyped, untyped


def test_no_import_cycles():
    graph = import_graph()
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_the_serving_layer_loads_no_torch(tmp_path):
    """In a fresh interpreter, importing every module under server/ (the front-end, transports, dispatcher,
    CLI) and the worker interface loads none of the GPU stack, nor ray (the default local worker never needs
    it): a front-end that only routes tasks to remote replicas starts in well under a second."""
    import subprocess
    import sys

    modules = sorted(m for m in package_modules() if layer_of(m) == "k5serve.server")
    modules += ["k5serve.pipelines.worker", "k5serve.pipelines.config", "k5serve.weights.checkpoints"]
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {GPU_STACK!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_default_server_imports_no_database_driver_or_s3_client(tmp_path, data_dir):
    """Without --database and an s3:// image store the app is built on SQLite and a folder and never imports
    psycopg or boto3 (optional extras)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from pathlib import Path\n"
            "from k5serve.server.app import create_app\n"
            "from k5serve.server.config import ServerConfig\n"
            "from k5serve.server.tasks.slot import ModelSlot\n"
            f"create_app(ServerConfig(data_dir=Path({str(tmp_path)!r})), ModelSlot(lambda: None))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('psycopg', 'psycopg_pool', 'ray', 'boto3', 'botocore')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_contract_scheduler_names_are_all_mapped():
    assert tuple(CONTRACT_SCHEDULERS) == tuple(PIPELINE_SCHEDULERS)


def test_failed_generation_fails_its_job_only(data_dir):
    from k5serve.pipelines.engine import K5Engine
    from k5serve.pipelines.loader import LoadConfig, load_t2i
    from k5serve.pipelines.local import LocalWorker
    from k5serve.pipelines.worker import GenerationError, GenerationSpec
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


def test_lint_clean():
    """ruff with the rule sets in pyproject.toml (pycodestyle E, pyflakes F, import order I, pyupgrade UP)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "ruff", "check", "k5serve", "server", "pipelines", "accel",
                          "weights", "benchmarks", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_package_folder_is_installed():
    """pyproject's explicit `packages` names every folder of the package (a new sub-package left out installs
    without it: caught here at once rather than by the slow install test)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in package_modules().items() if path.name == "__init__.py"}
    assert found == listed
