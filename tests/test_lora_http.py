"""LoRA through the real server: `--lora-dir`, per-request adapters, exact return to base, clear errors."""

from __future__ import annotations

import base64

import pytest
from conftest import task
from safetensors.torch import save_file
from test_lora import ATTN, FFN, peft_lora


@pytest.fixture(scope="module")
def lora_server(start_server, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    save_file({f"transformer.{k}": v for k, v in peft_lora(ATTN + FFN, seed=1).items()},
              lora_dir / "civitai:123@456.safetensors")
    save_file(peft_lora(ATTN, seed=2), lora_dir / "style.safetensors")  # unprefixed PEFT keys
    return start_server("--lora-dir", str(lora_dir), "--max-loras", "2")


def png(srv, **fields) -> bytes:
    resp = srv.post([task(outputType="base64Data", outputFormat="PNG", **fields)])
    assert resp.status_code == 200, resp.text
    return base64.b64decode(resp.json()["data"][0]["imageBase64Data"])


def test_lora_changes_the_image_and_weight_zero_and_no_lora_are_exactly_base(lora_server):
    base = png(lora_server)
    with_lora = png(lora_server, lora=[{"model": "civitai:123@456", "weight": 1.0}])
    assert with_lora != base
    assert png(lora_server, lora=[{"model": "civitai:123@456", "weight": 0}]) == base
    assert png(lora_server) == base  # after a LoRA request, the next one without is the base model again
    assert png(lora_server, lora=[{"model": "civitai:123@456", "transformer": "high"}]) == with_lora
    negative = png(lora_server, lora=[{"model": "civitai:123@456", "weight": -1.5}])
    assert negative not in (base, with_lora)


def test_two_loras_together(lora_server):
    one = png(lora_server, lora=[{"model": "civitai:123@456", "weight": 0.8}])
    other = png(lora_server, lora=[{"model": "style", "weight": 0.8}])
    both = png(lora_server, lora=[{"model": "civitai:123@456", "weight": 0.8}, {"model": "style", "weight": 0.8}])
    assert len({one, other, both}) == 3


@pytest.mark.parametrize("model", ["missing:1@1", "../civitai:123@456", "/etc/passwd", ".hidden", "a/b"])
def test_unknown_or_escaping_lora_names_are_refused(lora_server, model):
    t = task(lora=[{"model": "style"}, {"model": model, "weight": 1}])
    resp = lora_server.post([t])
    assert resp.status_code == 400, resp.text
    [err] = resp.json()["errors"]
    assert err["code"] == "invalidLoraModel" and err["parameter"] == "lora[1].model"
    assert err["taskUUID"] == t["taskUUID"] and model in err["message"]
