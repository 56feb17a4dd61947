"""README.md's examples, run as written: every `sh`, `python` and `json` block is run or checked here, so the
page a newcomer reads first cannot drift from the code.

The commands run in a scratch folder that links this checkout's Makefile, pyproject.toml and .venv, so what
they write (out/, .k5serve/, first.py) lands there. The one thing changed is the port: each block's
127.0.0.1:8080 becomes the port of the server that the README's own `make serve` started. A block that cannot
run here is listed in NOT_RUN with the reason; a block that is neither run nor listed fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, wait_ready
from ports import free_port

README = ROOT / "README.md"
NOT_RUN = {
    # The weights come from the Hugging Face Hub, which the tests cannot reach, and real images need a GPU.
    ".venv/bin/k5serve weights download\nmake serve": "no model hub and no GPU in the tests",
    # The suite itself.
    "make test": "this is the suite",
}


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m[1], m[2].strip("\n")) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)]


@pytest.fixture(scope="module")
def readme() -> list[tuple[str, str]]:
    return blocks(README.read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # .venv's install must be up to date for the checkout itself, or `make` in the scratch folder would
    # install the package from there (after `make test` this does nothing).
    subprocess.run(["make", "-s", "install"], cwd=ROOT, check=True, capture_output=True, timeout=1200)
    work = tmp_path_factory.mktemp("readme")
    for name in ("Makefile", "pyproject.toml", ".venv"):
        (work / name).symlink_to(ROOT / name)
    return work


@pytest.fixture(scope="module")
def started(readme, workdir):
    """The README's `make serve`, as written, on a free port (the Makefile's PORT, from the environment)."""
    assert ("sh", "make serve") in readme
    port = free_port()
    env = dict(os.environ, PORT=str(port), HF_HUB_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    log = open(workdir / "serve.log", "w")
    proc = subprocess.Popen(["bash", "-c", "make serve"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, workdir / "serve.log")
        yield port
    finally:
        if proc.poll() is None:  # (make and the server it started: one process group)
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def run_sh(body: str, port: int, cwd: Path, timeout: float = 600) -> str:
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", body.replace("127.0.0.1:8080", f"127.0.0.1:{port}")],
                         cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{body}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    return res.stdout


def test_every_block_is_run_or_says_why_not(readme):
    handled = {"make serve", "make test"} | set(NOT_RUN)
    for lang, body in readme:
        if lang == "sh":
            assert (body in handled or body.startswith(("curl ", ".venv/bin/pip install runware",
                                                        ".venv/bin/k5serve generate"))), body
        else:
            assert lang in ("python", "json", "toml"), f"a {lang or 'plain'} block: run it here or say why not"
    assert NOT_RUN.keys() <= {body for _, body in readme}, "NOT_RUN lists a block the README no longer has"


def test_the_tenants_example_is_a_tenants_file_the_server_takes(readme):
    from k5serve.server.tenants import parse_tenants

    [example] = [body for lang, body in readme if lang == "toml"]
    web, ops = parse_tenants(example)
    assert (web.name, web.weight, web.max_queued, web.max_per_minute, web.admin) == ("web-app", 2, 20, 120, False)
    assert ops.name == "ops" and ops.admin


def test_the_first_request_with_curl(readme, started, workdir):
    [curl] = [body for lang, body in readme if lang == "sh" and body.startswith("curl ")]
    [shown] = [body for lang, body in readme if lang == "json"]
    answer = json.loads(run_sh(curl, started, workdir))
    [item] = answer["data"]
    [example] = json.loads(shown.replace("…", ""))["data"]
    assert set(item) == set(example) and item["seed"] == example["seed"] == 42
    assert item["imageURL"] == f"http://127.0.0.1:{started}/image/{item['imageUUID']}.jpg"
    image = httpx.get(item["imageURL"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


def test_the_first_request_with_the_runware_sdk(readme, started, workdir):
    [pip] = [body for lang, body in readme if lang == "sh" and body.startswith(".venv/bin/pip install runware")]
    pinned = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
              ["test"] if d.startswith("runware==")]
    assert pip == f".venv/bin/pip install {pinned[0]}"  # the version the suite tests
    run_sh(pip, started, workdir)  # already installed by `make test`: pip only says so
    [program] = [body for lang, body in readme if lang == "python"]
    (workdir / "first.py").write_text(program.replace("127.0.0.1:8080", f"127.0.0.1:{started}"))
    assert "`.venv/bin/python first.py`" in README.read_text()
    urls = run_sh(".venv/bin/python first.py", started, workdir).split()
    assert len(urls) == 2
    for url in urls:
        assert url.startswith(f"http://127.0.0.1:{started}/image/") and httpx.get(url).status_code == 200


def test_generate_without_a_server(readme, workdir):
    [generate] = [body for lang, body in readme if lang == "sh" and body.startswith(".venv/bin/k5serve generate")]
    run_sh(generate, 0, workdir)
    results = json.loads((workdir / "out" / "results.json").read_text())  # the second command's
    assert "errors" not in results and [item["seed"] for item in results["data"]] == [3]
    assert len(list((workdir / "out").glob("*.jpg"))) == 2  # one image from each command
