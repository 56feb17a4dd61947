"""The `k5serve` command line: offline generation, tiny weights, model resolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import API_KEY, MODEL, ROOT
from PIL import Image

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def k5serve(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "k5serve.server.cli", *args], cwd=cwd, env=env or ENV, capture_output=True, text=True,
        timeout=600,
    )


def test_generate_from_flags(tmp_path, data_dir):
    out = tmp_path / "out"
    res = k5serve("generate", "--tiny", "--data-dir", str(data_dir), "--prompt", "a lighthouse at dusk",
                  "--steps", "10", "--seed", "3", "--number-results", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "results.json").read_text())
    assert "errors" not in result
    assert [i["seed"] for i in result["data"]] == [3, 4]
    for item in result["data"]:
        assert item["taskType"] == "imageInference" and item["imageURL"].startswith("file://")
        assert Image.open(item["imagePath"]).size == (1024, 1024)
        assert item["imagePath"].endswith(".jpg")  # the API's default format
    assert "| k5serve: CPU TEST MODE (--tiny)" in res.stderr  # the same box as serve's, less the addresses
    assert "steps" in res.stderr and "tasks" in res.stderr  # progress bars


def test_generate_help_puts_everyday_flags_first():
    res = k5serve("generate", "--help")
    assert res.returncode == 0
    text = res.stdout
    options = text[text.index("options:"):]
    assert options.index("--prompt PROMPT ") < options.index("--tiny ") < options.index("--steps STEPS ")
    assert options.index("--steps STEPS ") < options.index("--model MODEL ")
    assert "default: JPG" in options and "default: 1024" in options


def test_generate_from_task_files_with_an_invalid_task(tmp_path, data_dir):
    good = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": MODEL,
            "positivePrompt": "a cat", "width": 640, "height": 1408, "steps": 10, "outputFormat": "WEBP"}
    bad = dict(good, taskUUID=str(uuid.uuid4()), steps=5)
    (tmp_path / "tasks.json").write_text(json.dumps([good, bad]))
    (tmp_path / "more.jsonl").write_text(json.dumps({"positivePrompt": "a dog", "width": 1024, "height": 1024,
                                                     "steps": 10, "seed": 9}) + "\n")
    out = tmp_path / "out"
    res = k5serve("generate", "--tiny", "--data-dir", str(data_dir), str(tmp_path / "tasks.json"),
                  str(tmp_path / "more.jsonl"), "--out", str(out))
    assert res.returncode == 1  # one task was invalid
    result = json.loads((out / "results.json").read_text())
    [err] = result["errors"]
    assert err["code"] == "invalidSteps" and err["taskUUID"] == bad["taskUUID"]
    first, second = result["data"]
    assert first["taskUUID"] == good["taskUUID"] and first["imagePath"].endswith(".webp")
    assert Image.open(first["imagePath"]).size == (640, 1408)
    assert second["seed"] == 9


def test_generate_reports_invalid_tasks_without_looking_for_weights(tmp_path):
    bad = {"positivePrompt": "a cat", "width": 1024, "height": 1024, "steps": 5}
    (tmp_path / "tasks.json").write_text(json.dumps([bad]))
    res = k5serve("generate", "--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path),
                  str(tmp_path / "tasks.json"), "--out", str(tmp_path / "out"))
    assert res.returncode == 1 and "no such model folder" not in res.stderr, res.stderr
    [err] = json.loads((tmp_path / "out" / "results.json").read_text())["errors"]
    assert err["code"] == "invalidSteps"
    assert not (tmp_path / "tiny").exists()


def test_generate_refuses_what_the_engine_does_not_serve(tmp_path, data_dir):
    task = {"positivePrompt": "a cat", "width": 1024, "height": 1024, "steps": 10, "safety": {"checkContent": True}}
    (tmp_path / "tasks.json").write_text(json.dumps([task]))
    res = k5serve("generate", "--tiny", "--safety-model", "none", "--data-dir", str(data_dir),
                  str(tmp_path / "tasks.json"), "--out", str(tmp_path / "out"))
    assert res.returncode == 1, res.stderr
    [err] = json.loads((tmp_path / "out" / "results.json").read_text())["errors"]
    assert err["code"] == "unsupportedSafety" and "--safety-model" in err["message"]


def test_generate_is_deterministic(tmp_path, data_dir):
    paths = []
    for name in ("a", "b"):
        res = k5serve("generate", "--tiny", "--data-dir", str(data_dir), "--prompt", "same prompt",
                      "--steps", "10", "--seed", "11", "--out", str(tmp_path / name))
        assert res.returncode == 0, res.stderr
        paths.append(json.loads((tmp_path / name / "results.json").read_text())["data"][0]["imagePath"])
    assert Path(paths[0]).read_bytes() == Path(paths[1]).read_bytes()


def test_weights_tiny_builds_both_checkpoints(tmp_path):
    res = k5serve("weights", "tiny", str(tmp_path))
    assert res.returncode == 0, res.stderr
    for kind in ("t2i", "i2i"):
        assert json.loads((tmp_path / kind / "model_index.json").read_text())["transformer"]


def test_serve_without_weights_fails_clearly(tmp_path):
    env = dict(ENV, HF_HOME=str(tmp_path / "hf"))
    res = k5serve("serve", "--data-dir", str(tmp_path), "--port", "1", env=env)
    assert res.returncode != 0
    assert "k5serve weights download" in res.stderr and "--tiny" in res.stderr
    res = k5serve("generate", "--prompt", "a red fox", "--data-dir", str(tmp_path), env=env)
    assert res.returncode != 0
    assert "k5serve weights download" in res.stderr and "--tiny" in res.stderr


def test_serve_in_test_mode_says_so_in_a_block(start_server):
    srv = start_server("--api-key", API_KEY, env={"K5SERVE_LOG_FORMAT": "text"})
    log = srv.log()
    block = log[log.index("+---"):log.rindex("---+")]
    assert all(len(line) <= 80 for line in block.splitlines()), block  # fits an 80-column terminal
    assert "CPU TEST MODE (--tiny)" in block and "noise from tiny random weights" in block
    assert f"Playground:  {srv.url}/" in block and f"POST {srv.url}/v1" in block
    assert "API key:     required" in block and API_KEY not in log
    assert "s an image at 20 steps on 2 CPU cores" in block and '"steps": 10' in block
    assert "weights download" in block


def test_serve_logs_json_lines_when_not_at_a_terminal(server):
    log = server.log()
    assert "+---" not in log and '"CPU TEST MODE: serving generated tiny weights' in log


def test_generate_needs_input(tmp_path):
    res = k5serve("generate", "--tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "--prompt" in res.stderr


@pytest.mark.parametrize("model", ["/no/such/folder", "not-a-repo-id"])
def test_bad_model_argument(tmp_path, model):
    res = k5serve("generate", "--model", model, "--prompt", "hello there", "--data-dir", str(tmp_path),
                  "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "no such model folder" in res.stderr


def test_one_server_per_data_dir(server):
    res = k5serve("serve", "--tiny", "--data-dir", str(server.data_dir), "--port", "1")
    assert res.returncode != 0 and "another k5serve process" in res.stderr
