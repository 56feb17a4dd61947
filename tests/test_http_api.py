"""imageInference over HTTP against the real server and the real pipeline on tiny weights."""

from __future__ import annotations

import base64
import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import API_KEY, task
from k5serve.server.protocol.models import SCHEDULER_NAMES
from PIL import Image


def pixels(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.int16)


def only_item(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "errors" not in body, body
    [item] = body["data"]
    return item


def only_error(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert "data" not in body, body
    [err] = body["errors"]
    return err


def b64_image(server, **fields) -> bytes:
    item = only_item(server.post([task(outputType="base64Data", outputFormat="PNG", **fields)]))
    return base64.b64decode(item["imageBase64Data"])


# --- results ---------------------------------------------------------------------------------------------


def test_health_reports_loaded_tiny_model(server):
    body = httpx.get(server.url + "/health").json()
    assert body["status"] == "ok" and body["tiny_weights"] is True and body["device"] == "cpu"
    plan = body["memory_plan"]  # made before the weights loaded; the loaded model's weights agree with it
    assert plan["profile"] == "full" and plan["fits"] is True and plan["device"] == "cpu"
    assert plan["device_weights_bytes"] == body["weights_bytes"] + plan["components"]["safety"]["weights"] + \
        plan["components"].get("transformer_i2i", {}).get("weights", 0)
    assert 0 < plan["peak_bytes"] <= plan["usable_bytes"] < plan["budget_bytes"]
    assert set(plan["peaks"]) == {"1024x1024 x1", "1024x1024 x4", "1408x640 x1", "1408x640 x4"}


def test_url_output_is_served_with_its_content_type(server):
    t = task()
    item = only_item(server.post([t]))
    assert item["taskType"] == "imageInference" and item["taskUUID"] == t["taskUUID"]
    assert uuid.UUID(item["imageUUID"]).version == 4
    assert item["seed"] == 42 and "cost" not in item
    assert set(item) == {"taskType", "taskUUID", "imageUUID", "imageURL", "seed"}
    assert item["imageURL"] == f"{server.url}/image/{item['imageUUID']}.jpg"
    got = httpx.get(item["imageURL"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert got.content[:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(got.content)).size == (1024, 1024)


@pytest.mark.parametrize(
    "fmt,magic,mime",
    [("PNG", b"\x89PNG", "image/png"), ("jpg", b"\xff\xd8\xff", "image/jpeg"), ("webp", b"RIFF", "image/webp")],
)
def test_every_output_format_and_type(server, fmt, magic, mime):
    item = only_item(server.post([task(outputType=["URL", "base64Data", "dataURI"], outputFormat=fmt)]))
    raw = base64.b64decode(item["imageBase64Data"])
    assert raw.startswith(magic)
    assert item["imageDataURI"] == f"data:{mime};base64,{item['imageBase64Data']}"
    assert httpx.get(item["imageURL"]).content == raw


def test_output_quality_changes_jpeg_size(server):
    small = only_item(server.post([task(outputType="base64Data", outputQuality=20)]))["imageBase64Data"]
    large = only_item(server.post([task(outputType="base64Data", outputQuality=99)]))["imageBase64Data"]
    assert len(small) < len(large)


def test_same_request_twice_gives_identical_png(server):
    assert b64_image(server, seed=7) == b64_image(server, seed=7)


def test_number_results_batch_matches_single_requests(server):
    t = task(numberResults=3, seed=100, outputType="base64Data", outputFormat="PNG")
    resp = server.post([t])
    assert resp.status_code == 200
    items = resp.json()["data"]
    assert [i["seed"] for i in items] == [100, 101, 102]
    assert len({i["imageUUID"] for i in items}) == 3 and all(i["taskUUID"] == t["taskUUID"] for i in items)
    batch = [pixels(base64.b64decode(i["imageBase64Data"])) for i in items]
    assert np.abs(batch[0] - batch[1]).mean() > 1, "different seeds must give different images"
    alone = pixels(b64_image(server, seed=101))
    # Batched and single runs differ only by float rounding in batched matmuls (documented in docs/api.md).
    assert np.abs(alone - batch[1]).max() <= 2


def test_missing_seed_is_random_32_bit_and_reported(server):
    seeds = {only_item(server.post([task(seed=None)]))["seed"] for _ in range(2)}
    assert len(seeds) == 2 and all(0 <= s < 2**32 for s in seeds)


def test_large_seed_accepted(server):
    item = only_item(server.post([task(seed=9223372036854775807)]))
    assert item["seed"] == 9223372036854775807


@pytest.mark.parametrize(
    "change",
    [
        {"positivePrompt": "a blue whale in the deep ocean"},
        {"negativePrompt": "blurry, low quality"},
        {"CFGScale": 3.0},
        {"steps": 12},
        {"scheduler": "UniPC"},
        {"seed": 43},
    ],
    ids=lambda c: next(iter(c)),
)
def test_generation_parameters_change_the_image(server, change):
    base = pixels(b64_image(server))
    changed = pixels(b64_image(server, **change))
    assert np.abs(base - changed).mean() > 0.5


def test_every_scheduler_produces_an_image(server):
    tasks = [task(scheduler=name, outputType="base64Data", outputFormat="PNG", seed=5) for name in SCHEDULER_NAMES]
    resp = server.post(tasks)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "errors" not in body
    assert [i["taskUUID"] for i in body["data"]] == [t["taskUUID"] for t in tasks]
    for item in body["data"]:
        img = pixels(base64.b64decode(item["imageBase64Data"]))
        assert img.shape == (1024, 1024, 3) and img.std() > 1


def test_other_sizes(server):
    item = only_item(server.post([task(width=1408, height=640, outputType="base64Data")]))
    assert Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"]))).size == (1408, 640)


def test_include_cost(server):
    item = only_item(server.post([task(includeCost=True)]))
    assert isinstance(item["cost"], float) and item["cost"] > 0


def test_unknown_fields_ignored_and_null_is_absent(server):
    item = only_item(server.post([task(somethingNew=1, negativePrompt=None, scheduler=None, lora=None)]))
    assert item["seed"] == 42


# --- image store ------------------------------------------------------------------------------------------


def test_request_ttl_sets_expiry(server):
    item = only_item(server.post([task(ttl=60)]))
    got = httpx.get(item["imageURL"])
    assert got.status_code == 200
    assert 50 <= int(got.headers["cache-control"].split("max-age=")[1]) <= 60


def test_image_dates_say_when_it_was_made_and_when_it_expires(server):
    from email.utils import parsedate_to_datetime

    before = time.time()
    item = only_item(server.post([task(ttl=3600)]))
    got = httpx.get(item["imageURL"])
    date, made = (parsedate_to_datetime(got.headers[h]).timestamp() for h in ("date", "last-modified"))
    expires = parsedate_to_datetime(got.headers["expires"]).timestamp()
    # The creation time, not the expiry (the file's mtime); uvicorn's Date is renewed once a second.
    assert int(before) - 1 <= made <= date + 1
    assert 3500 <= expires - made <= 3601


def test_operator_ttl_expires_images(start_server):
    srv = start_server("--image-ttl", "2")
    item = only_item(srv.post([task()]))
    assert httpx.get(item["imageURL"]).status_code == 200
    time.sleep(3)
    assert httpx.get(item["imageURL"]).status_code == 404
    assert not (srv.data_dir / "images" / item["imageURL"].rsplit("/", 1)[1]).exists()


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "nope.png", f"{uuid.uuid4()}.exe", f"{uuid.uuid4()}.png"])
def test_bad_image_names_are_404(server, name):
    resp = httpx.get(f"{server.url}/image/{name}")
    assert resp.status_code == 404


# --- validation -------------------------------------------------------------------------------------------

def _acc(options: dict, code: str, name: str) -> tuple[dict, str, str]:
    """An INVALID row for acceleratorOptions.<name>."""
    return {"acceleratorOptions": options}, code, f"acceleratorOptions.{name}"


INVALID = [
    ({"positivePrompt": ...}, "missingPositivePrompt", "positivePrompt"),
    ({"positivePrompt": "a"}, "invalidPositivePrompt", "positivePrompt"),
    ({"positivePrompt": 5}, "invalidPositivePrompt", "positivePrompt"),
    ({"positivePrompt": "x" * 32001}, "invalidPositivePrompt", "positivePrompt"),
    ({"negativePrompt": "x"}, "invalidNegativePrompt", "negativePrompt"),
    ({"negativePrompt": "x" * 3001}, "invalidNegativePrompt", "negativePrompt"),
    ({"model": ...}, "missingModel", "model"),
    ({"model": "runware:101@1"}, "unknownModel", "model"),
    ({"width": 1000}, "invalidWidth", "width"),
    ({"height": 1000}, "invalidHeight", "height"),
    ({"width": 1024, "height": 1408}, "invalidHeight", "height"),
    ({"width": ...}, "missingWidth", "width"),
    ({"height": ...}, "missingHeight", "height"),
    ({"width": ..., "height": ...}, "missingWidth", "width"),
    ({"width": "1024"}, "invalidWidth", "width"),
    ({"seed": -1}, "invalidSeed", "seed"),
    ({"seed": 9223372036854775808}, "invalidSeed", "seed"),
    ({"seed": 1.5}, "invalidSeed", "seed"),
    ({"steps": 9}, "invalidSteps", "steps"),
    ({"steps": 51}, "invalidSteps", "steps"),
    ({"scheduler": "Heun"}, "invalidScheduler", "scheduler"),
    ({"scheduler": "euler"}, "invalidScheduler", "scheduler"),
    ({"CFGScale": 1.9}, "invalidCFGScale", "CFGScale"),
    ({"CFGScale": 10.5}, "invalidCFGScale", "CFGScale"),
    ({"numberResults": 0}, "invalidNumberResults", "numberResults"),
    ({"numberResults": 21}, "invalidNumberResults", "numberResults"),
    ({"outputType": "PNG"}, "invalidOutputType", "outputType"),
    ({"outputFormat": "TIFF"}, "invalidOutputFormat", "outputFormat"),
    ({"outputQuality": 19}, "invalidOutputQuality", "outputQuality"),
    ({"outputQuality": 100}, "invalidOutputQuality", "outputQuality"),
    ({"ttl": 59}, "invalidTtl", "ttl"),
    ({"includeCost": "yes"}, "invalidIncludeCost", "includeCost"),
    ({"deliveryMethod": "later"}, "invalidDeliveryMethod", "deliveryMethod"),
    ({"lora": [{"weight": 1}]}, "missingLoraModel", "lora[0].model"),
    ({"lora": [{"model": "a:1@1", "weight": 4.5}]}, "invalidLoraWeight", "lora[0].weight"),
    ({"lora": [{"model": "a:1@1", "transformer": "mid"}]}, "invalidLoraTransformer", "lora[0].transformer"),
    _acc({"teaCacheDistance": 1.5}, "invalidTeaCacheDistance", "teaCacheDistance"),
    _acc({"fbCacheThreshold": -0.1}, "invalidFbCacheThreshold", "fbCacheThreshold"),
    _acc({"dbCacheSkipInterval": 0}, "invalidDbCacheSkipInterval", "dbCacheSkipInterval"),
    _acc({"cacheMaxConsecutiveSteps": 6}, "invalidCacheMaxConsecutiveSteps", "cacheMaxConsecutiveSteps"),
    _acc({"cacheEndStep": 11}, "invalidCacheEndStep", "cacheEndStep"),
    _acc({"cacheStartStep": 5, "cacheEndStep": 5}, "invalidCacheStartStep", "cacheStartStep"),
    _acc({"cacheStartStepPercentage": 50, "cacheEndStepPercentage": 40}, "invalidCacheStartStepPercentage",
         "cacheStartStepPercentage"),
    _acc({"cacheEndStepPercentage": 101}, "invalidCacheEndStepPercentage", "cacheEndStepPercentage"),
    ({"safety": {"mode": "full"}}, "invalidSafetyMode", "safety.mode"),
    ({"strength": 1.5}, "invalidStrength", "strength"),
    ({"taskUUID": "not-a-uuid"}, "invalidTaskUUID", "taskUUID"),
]


@pytest.mark.parametrize("change,code,parameter", INVALID, ids=[c for _, c, _ in INVALID])
def test_invalid_parameters_get_named_errors(server, change, code, parameter):
    t = task(**change)
    err = only_error(server.post([t]))
    assert err["code"] == code and err["parameter"] == parameter
    assert err["taskType"] == "imageInference" and err["taskUUID"] == t["taskUUID"]
    assert err["message"] and err["documentation"].startswith("https://")


def test_range_errors_report_bounds_and_allowed_values(server):
    assert only_error(server.post([task(steps=51)]))["max"] == 50
    assert only_error(server.post([task(CFGScale=1)]))["min"] == 2
    assert "DDIM" in only_error(server.post([task(scheduler="nope")]))["allowedValues"]
    assert "1280x768" in only_error(server.post([task(width=512, height=512)]))["allowedValues"]
    assert only_error(server.post([task(positivePrompt=3)]))["type"] == "string"


@pytest.mark.parametrize(
    "change,code",
    [
        ({"lora": [{"model": "civitai:1@1", "weight": 0.5}]}, "unsupportedLora"),  # no --lora-dir
    ],
)
def test_features_not_enabled_are_refused_not_ignored(server, change, code):
    err = only_error(server.post([task(**change)]))
    assert err["code"] == code and "not available" in err["message"]


def test_features_switched_off_are_fine(server):
    item = only_item(
        server.post([task(lora=[], acceleratorOptions={"teaCache": False}, safety={"checkContent": False},
                          deliveryMethod="sync")])
    )
    assert item["imageUUID"]


def test_mixed_batch_returns_data_and_errors(server):
    good, bad = task(), task(width=10)
    resp = server.post([good, bad])
    assert resp.status_code == 200
    body = resp.json()
    assert [i["taskUUID"] for i in body["data"]] == [good["taskUUID"]]
    assert [e["taskUUID"] for e in body["errors"]] == [bad["taskUUID"]]


def test_unsupported_task_type(server):
    t = {"taskType": "videoInference", "taskUUID": str(uuid.uuid4())}
    err = only_error(server.post([t]))
    assert err["code"] == "unsupportedTaskType" and err["taskUUID"] == t["taskUUID"]
    assert err["taskType"] == "videoInference"


def test_task_without_task_type(server):
    assert only_error(server.post([{"taskUUID": str(uuid.uuid4())}]))["code"] == "missingTaskType"
    assert only_error(server.post(["hello"]))["code"] == "invalidTask"


@pytest.mark.parametrize(
    "body,code",
    [(b"{not json", "invalidJSON"), (b'{"taskType": "imageInference"}', "invalidRequestBody"),
     (b"[]", "invalidRequestBody"), (b"\xff\xfe", "invalidJSON")],
)
def test_malformed_bodies(server, body, code):
    resp = httpx.post(server.url + "/v1", content=body, headers={"content-type": "application/json"})
    assert only_error(resp)["code"] == code


def test_oversized_body_refused_before_reading(server):
    resp = httpx.post(server.url + "/v1", content=b"[" + b" " * (65 * 1024 * 1024) + b"]")
    assert only_error(resp, 413)["code"] == "payloadTooLarge"


def test_ping_over_http(server):
    resp = server.post([{"taskType": "ping", "ping": True}])
    assert resp.json() == {"data": [{"taskType": "ping", "pong": True}]}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_on_the_endpoint_get_the_error_shape(server, method):
    resp = httpx.request(method, server.url + "/v1")
    err = only_error(resp, 405)
    assert err["code"] == "methodNotAllowed" and "POST /v1" in err["message"] and f"{method} /v1" in err["message"]
    assert resp.headers["allow"] == "POST"


def test_other_methods_elsewhere_are_named_with_the_allowed_one(server):
    resp = httpx.post(server.url + "/health")
    err = only_error(resp, 405)
    assert err["code"] == "methodNotAllowed" and err["message"] == "POST /health is not served; GET is."


def test_unknown_paths_get_the_error_shape(server):
    err = only_error(httpx.post(server.url + "/v2", json=[]), 404)
    assert err["code"] == "notFound" and "POST /v2" in err["message"] and "POST /v1" in err["message"]


def test_trailing_slash_endpoint(server):
    resp = httpx.post(server.url + "/v1/", json=[task()], timeout=300)
    assert only_item(resp)["imageUUID"]


# --- auth -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(start_server):
    return start_server("--api-key", API_KEY, "--model-alias", "k5:lite@1", "--price-per-gpu-hour", "3600")


def test_missing_key_is_401(keyed_server):
    err = only_error(keyed_server.post([task()]), 401)
    assert err["code"] == "invalidApiKey" and err["taskType"] == "authentication" and "taskUUID" not in err


def test_bad_key_is_401(keyed_server):
    wrong = {"Authorization": "Bearer wrong-key-0000000000000000000"}
    err = only_error(keyed_server.post([task()], headers=wrong), 401)
    assert err["code"] == "invalidApiKey" and "Invalid API key" in err["message"]
    err = only_error(keyed_server.post([{"taskType": "authentication", "apiKey": "nope"}, task()]), 401)
    assert err["code"] == "invalidApiKey"


def test_bearer_key_and_model_alias(keyed_server):
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    resp = keyed_server.post([task(model="k5:lite@1", includeCost=True)], headers=bearer)
    item = only_item(resp)
    # price 3600 USD per GPU-hour = 1 USD per busy second
    assert 0.01 < item["cost"] < 120


def test_authentication_task_first(keyed_server):
    resp = keyed_server.post([{"taskType": "authentication", "apiKey": API_KEY}, task()])
    data = resp.json()["data"]
    assert resp.status_code == 200 and data[0]["taskType"] == "authentication"
    assert uuid.UUID(data[0]["connectionSessionUUID"]) and "taskUUID" not in data[0]
    assert data[1]["imageUUID"]


def test_key_never_logged(keyed_server):
    keyed_server.post([task()], headers={"Authorization": "Bearer some-secret-wrong-key-000000000"})
    assert API_KEY not in keyed_server.log() and "some-secret-wrong-key" not in keyed_server.log()


# --- worker queue -----------------------------------------------------------------------------------------


def test_full_queue_gets_429_and_server_keeps_working(start_server):
    srv = start_server("--max-queue", "1")
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: srv.post([task(steps=30)]), range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and 429 in statuses, statuses
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"].isdigit()
    assert limited.json()["errors"][0]["code"] == "rateLimitExceeded"
    assert only_item(srv.post([task()]))["imageUUID"]
