"""The OpenAI Images API (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`) driven by the unmodified
official `openai` SDK against the real server on tiny weights: one Runware task per request, the same results
as the Runware API for the same parameters, errors as the SDK's typed exceptions."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from conftest import API_KEY, MODEL
from PIL import Image

CAPPED = "openai-capped-key-0123456789abcdef"  # a tenant allowed one task a minute
FAST = {"num_inference_steps": 10}  # the fewest steps: the tests' images are noise anyway


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    tenants = tmp_path_factory.mktemp("openai-tenants") / "tenants.toml"
    tenants.write_text(f'[[tenant]]\nname = "ops"\nkey = "{API_KEY}"\nadmin = true\n'
                       f'[[tenant]]\nname = "capped"\nkey = "{CAPPED}"\nmax_per_minute = 1\n')
    return start_server("--tenants", str(tenants))


def client(server, key=API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=300)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_generation_as_open_webui_sends_it_is_the_runware_task_with_the_same_seed(server):
    """Open WebUI's default: 512x512, b64_json. Served at 1024x1024 (the supported size of that aspect ratio),
    the answer says so, each image carries its seed, and the bytes are those of the Runware task with the same
    parameters (one generation path)."""
    raw = client(server).images.with_raw_response.generate(
        model="kandinsky-5.0-image-lite", prompt="a red fox in the snow", n=2, size="512x512",
        response_format="b64_json", extra_body=FAST | {"seed": 7})
    answer = raw.parse()
    assert answer.size == "1024x1024" and answer.output_format == "png" and len(answer.data) == 2
    images = [base64.b64decode(item.b64_json) for item in answer.data]
    assert all(png(data).size == (1024, 1024) and data[:4] == b"\x89PNG" for data in images)
    assert [item.model_extra["seed"] for item in answer.data] == [7, 8]
    task_uuid = raw.headers["X-Task-UUID"]
    runware = server.post([{"taskType": "imageInference", "taskUUID": "0" * 8 + task_uuid[8:], "model": MODEL,
                            "positivePrompt": "a red fox in the snow", "width": 1024, "height": 1024, "steps": 10,
                            "seed": 7, "numberResults": 2, "outputType": "base64Data", "outputFormat": "PNG"}],
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert [base64.b64decode(i["imageBase64Data"]) for i in runware.json()["data"]] == images
    # ...and the task is a task like any other: getResponse reads it.
    again = server.post([{"taskType": "getResponse", "taskUUID": task_uuid}],
                        headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    assert [i["seed"] for i in again] == [7, 8]


def test_librechat_defaults_and_urls(server):
    """LibreChat sends size, quality and background auto, output_format and output_compression, and reads
    b64_json; with response_format url the image is fetched from the server."""
    answer = client(server).images.generate(model=MODEL, prompt="a lighthouse at dusk", n=1, size="auto",
                                            quality="low", background="auto", output_format="jpeg",
                                            output_compression=50, moderation="auto", user="someone")
    assert answer.size == "1024x1024" and answer.output_format == "jpeg" and answer.quality == "low"
    assert base64.b64decode(answer.data[0].b64_json)[:2] == b"\xff\xd8"
    wide = client(server).images.generate(prompt="a lighthouse at dusk", size="1500x700", response_format="url",
                                          output_format="webp", extra_body=FAST)
    assert wide.size == "1408x640" and wide.data[0].b64_json is None
    fetched = httpx.get(wide.data[0].url)
    assert fetched.status_code == 200 and png(fetched.content).size == (1408, 640)


@pytest.mark.parametrize("fields, param", [
    ({"model": "dall-e-3"}, "model"),
    ({"size": "big"}, "size"),
    ({"n": 11}, "n"),
    ({"background": "transparent"}, "background"),
    ({"quality": "max"}, "quality"),
    ({"stream": True}, "stream"),
    ({"prompt": "a"}, "prompt"),
    ({"extra_body": {"num_inference_steps": 5}}, "num_inference_steps"),
    ({"extra_body": {"guidance_scale": 50}}, "guidance_scale"),
    ({"extra_body": {"negative_prompt": ""}}, "negative_prompt"),
    ({"extra_body": {"frames": 3}}, "frames"),
])
def test_a_bad_field_is_a_bad_request_naming_it(server, fields, param):
    request = {"prompt": "a red fox", **fields}
    with pytest.raises(openai.BadRequestError) as exc:
        client(server).images.generate(**request)
    error = exc.value.body
    assert exc.value.status_code == 400 and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"]


def test_keys_limits_and_unknown_paths_answer_in_openais_shape(server):
    with pytest.raises(openai.AuthenticationError) as exc:
        client(server, "not-a-key-0123456789abcdef").images.generate(prompt="a red fox")
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalidApiKey"
    capped = client(server, CAPPED)
    assert capped.images.generate(prompt="a red fox", extra_body=FAST).data
    with pytest.raises(openai.RateLimitError) as exc:
        capped.images.generate(prompt="a red fox", extra_body=FAST)
    assert 1 <= int(exc.value.response.headers["Retry-After"]) <= 60 and "max_per_minute" in exc.value.message
    missing = httpx.post(server.url + "/v1/images/variations", headers={"Authorization": f"Bearer {API_KEY}"})
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    broken = httpx.post(server.url + "/v1/images/generations", content=b"{", headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"


def test_models_lists_the_model(server):
    [model] = client(server).models.list().data
    assert model.id == MODEL and model.object == "model"


def _png_bytes(size=(96, 64), color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_an_edit_runs_the_editing_model_at_the_inputs_aspect_ratio(server):
    answer = client(server).images.edit(image=("in.png", _png_bytes(), "image/png"), prompt="make it blue",
                                        extra_body=FAST | {"seed": 3})
    assert answer.size == "1280x768" and len(answer.data) == 1  # 96x64 is 3:2; 1280x768 (5:3) is the nearest
    assert png(base64.b64decode(answer.data[0].b64_json)).size == (1280, 768)
    log = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(entry.get("transport") == "openai" and entry.get("caller") == "ops" for entry in log)


def test_an_edit_as_librechat_sends_it_image_brackets(server):
    """LibreChat sends the file in image[] (one here), with size auto and quality auto."""
    answer = httpx.post(server.url + "/v1/images/edits", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300,
                        files={"image[]": ("in.png", _png_bytes((64, 96)), "image/png")},
                        data={"prompt": "make it blue", "size": "auto", "quality": "low", "model": MODEL})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["size"] == "768x1280" and png(base64.b64decode(body["data"][0]["b64_json"])).size == (768, 1280)


@pytest.mark.parametrize("extra, param", [
    ({"mask": ("mask.png", _png_bytes(), "image/png")}, "mask"),
    ({"image": [("a.png", _png_bytes(), "image/png"), ("b.png", _png_bytes(), "image/png")]}, "image"),
    ({"image": ("a.png", b"not an image", "image/png")}, "image"),
])
def test_an_edit_that_cannot_be_done_is_a_bad_request_naming_the_field(server, extra, param):
    request = {"image": ("in.png", _png_bytes(), "image/png"), "prompt": "make it blue", **extra}
    with pytest.raises(openai.BadRequestError) as exc:
        client(server).images.edit(**request)
    assert exc.value.body["param"] == param, exc.value.body


def test_the_routes_are_in_the_openapi_document(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/models"} <= set(paths)
    body = paths["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in body["properties"] and body["required"] == ["prompt"]
