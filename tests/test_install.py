"""Installing k5serve: one top-level import package, `k5serve`, in both install modes.

The repository keeps `server/`, `pipelines/`, `accel/`, `weights/` at its top level; setuptools' `package-dir`
maps them to `k5serve.server`, ... Editable installs of mapped packages go through setuptools' import hook
rather than a path entry, so both modes are checked: from a copy of the working tree, into a fresh virtualenv,
then run from a directory outside it. The new virtualenv takes its dependencies (and pip and setuptools, for
`--no-build-isolation`) from this test environment through a `.pth` line, so nothing is downloaded. Neither
install prints a setuptools warning.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest
from conftest import ROOT

CHECK = """
import importlib, importlib.metadata, pathlib, sys
import k5serve, k5serve.server.cli, k5serve.server.app, k5serve.pipelines.worker
print("cli", pathlib.Path(k5serve.server.cli.__file__).resolve())
print("version", k5serve.__version__, importlib.metadata.version("k5serve"))
for name in ("server", "pipelines", "accel", "weights"):
    try:
        importlib.import_module(name)
        print("importable", name)
    except ModuleNotFoundError:
        pass
import k5serve.pipelines.local, k5serve.weights.tiny, k5serve.accel.hooks  # the torch side imports too
from k5serve.server.transport import playground  # the page's files are package data
assert {p.name for p in playground.PAGES.iterdir()} >= {"index.html", "queue.html", "static"}
assert {p.name for p in playground.ASSETS.iterdir()} >= {"app.css", "common.js", "playground.js", "queue.js"}
print("ok")
"""


def working_tree_copy(dest):
    """The files git would commit (tracked and untracked-but-not-ignored), tests and benchmarks left out."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if name.split("/")[0] in ("tests", "benchmarks") or not (ROOT / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def setuptools_warnings(output: str) -> list[str]:
    """The warnings the build backend printed during an install (pip shows them as `file:line: SomeWarning: ...`).

    Left out: setuptools' "Editable installation" notice (an InformationOnly, printed for every editable install
    that goes through its import hook, as a package-dir mapping must), which is about no setting of this project.
    """
    return [line.strip() for line in output.splitlines()
            if (re.search(r"\b[A-Za-z]*Warning: ", line) or "Package would be ignored" in line)
            and not line.rstrip().endswith("Warning: Editable installation.")]


def test_setuptools_warnings_are_recognised():
    seen = """  /venv/setuptools/command/build_py.py:215: BuildBackendWarning: Package 'k5serve.server.x' is ...
  !!
          # Package would be ignored #
  /venv/setuptools/command/editable_wheel.py:354: BuildBackendWarning: Editable installation.
  /venv/setuptools/dist.py:759: SetuptoolsDeprecationWarning: License classifiers are deprecated.
WARNING: Location 'file:///opt/pypi-more/simple/pip/' is ignored: it is neither a file nor a directory.
Successfully installed k5serve-0.1.0"""
    found = setuptools_warnings(seen)
    assert len(found) == 3, found
    assert "Package would be ignored" in found[1] and found[2].endswith("License classifiers are deprecated.")


@pytest.mark.parametrize("mode", ["regular", "editable"])
def test_installs_as_one_k5serve_package(tmp_path, mode):
    source = working_tree_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / site / "k5serve_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # Not --quiet: pip shows what the build backend warns about, as a user running `pip install` sees it.
    install = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
               *(["-e"] if mode == "editable" else []), str(source)]
    res = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert setuptools_warnings(res.stdout + res.stderr) == [], res.stdout + res.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([python, "-c", CHECK], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert "importable" not in lines, res.stdout  # no generic top-level names: server, pipelines, ...
    assert res.stdout.splitlines()[-1] == "ok"
    installed = (source if mode == "editable" else tmp_path / site / "k5serve").resolve()
    assert lines["cli"].startswith(str(installed)), (lines["cli"], installed)  # not this checkout
    # Only `k5serve` (and its metadata) lands in site-packages.
    ours = {p.name for p in (tmp_path / site).iterdir()} - {"k5serve_test_deps.pth", "__pycache__"}
    assert {n for n in ours if not n.startswith(("k5serve", "__editable__"))} == set(), ours

    for command in ([venv / "bin" / "k5serve", "--help"], [venv / "bin" / "k5serve", "serve", "--help"],
                    [python, "-m", "k5serve", "weights", "--help"]):
        res = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "usage: k5serve" in res.stdout, res.stderr
    assert "K5SERVE_IMAGE_TTL" in subprocess.run([venv / "bin" / "k5serve", "serve", "--help"], cwd=elsewhere,
                                                  capture_output=True, text=True).stdout


def test_build_backend_understands_the_license_field():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # PEP 639: a bare SPDX string needs setuptools >= 77
    [setuptools] = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    from packaging.requirements import Requirement
    from packaging.version import Version

    spec = Requirement(setuptools).specifier
    assert not spec.contains(Version("76.1")) and spec.contains(Version("80.9"))
