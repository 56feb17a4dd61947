"""The Dockerfile cannot be built here (no container engine): lint it with hadolint and keep it consistent
with pyproject.toml and the server's own endpoints."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(name: str) -> list[str]:
    """Arguments of every `name` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    res = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_base_image_torch_matches_the_pin():
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    [base] = [a for a in instructions("ARG") if a.startswith("BASE=")]
    assert base.startswith("BASE=pytorch/pytorch:") and f":{torch_pin.removeprefix('torch==')}-cuda" in base
    assert "runtime" in base


def test_every_package_is_copied_and_installed():
    copies = " ".join(instructions("COPY"))
    for folder in PYPROJECT["tool"]["setuptools"]["package-dir"].values():  # k5serve.server is server/, ...
        assert f"COPY {folder} ./{folder}" in "COPY " + " COPY ".join(instructions("COPY")), folder
    assert "pyproject.toml" in copies and "README.md" in copies  # the build reads both
    installs = [a for a in instructions("RUN") if a.startswith("pip install")]
    assert any(a.rstrip().endswith((" .", ' ".[postgres,s3,fp8,quant]"')) for a in installs), installs
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert all(extra in extras for a in installs for extra in a.partition("[")[2].partition("]")[0].split(",") if extra)


def test_runs_as_non_root_with_volumes_port_and_readiness_check():
    [user] = instructions("USER")
    assert user.split(":")[0] not in ("0", "root")
    env = " ".join(instructions("ENV"))
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    [volume] = instructions("VOLUME")
    assert hf_home in volume  # the weights survive the container
    [port] = instructions("EXPOSE")
    [cmd] = instructions("CMD")
    assert f'"--port", "{port}"' in cmd and '"0.0.0.0"' in cmd
    [health] = instructions("HEALTHCHECK")
    assert f"127.0.0.1:{port}/ready" in health
    assert instructions("ENTRYPOINT") == ['["k5serve"]'] and "k5serve" in PYPROJECT["project"]["scripts"]
