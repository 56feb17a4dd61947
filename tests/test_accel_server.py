"""acceleratorOptions end to end: validation through HTTP, runs through HTTP, WebSocket and the official
SDK, per-task pass counts in the log, metrics and `k5serve generate --stats`."""

from __future__ import annotations

import json
import re

import pytest
from conftest import API_KEY, task
from prometheus_client.parser import text_string_to_metric_families
from test_cli import k5serve
from test_http_api import only_error, only_item
from test_sdk import request, run
from test_ws import Client

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
SKIPS = 1.0  # a threshold that skips on tiny random weights (see test_accel.py)


@pytest.fixture(scope="module")
def accel_server(start_server):
    return start_server("--api-key", API_KEY)


def post(server, **fields):
    return server.post([task(**fields)], headers=HEADERS)


def passes(server) -> dict[tuple[str, str, str], float]:
    text = __import__("httpx").get(server.url + "/metrics").text
    return {(s.labels["cache"], s.labels["branch"], s.labels["outcome"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if family.name == "k5serve_transformer_passes" and s.name.endswith("_total")}


@pytest.mark.parametrize("options,code,parameter", [
    ({"teaCache": True, "fbCache": True}, "conflictAcceleratorOptions", "acceleratorOptions.fbCache"),
    ({"fbCache": True, "dbCache": True, "teaCache": True}, "conflictAcceleratorOptions", "acceleratorOptions.fbCache"),
    ({"teaCache": True, "cacheStartStep": 8, "cacheEndStepPercentage": 50}, "invalidCacheStartStep",
     "acceleratorOptions.cacheStartStep"),
    ({"dbCache": True, "cacheStartStepPercentage": 90, "cacheEndStep": 5}, "invalidCacheStartStepPercentage",
     "acceleratorOptions.cacheStartStepPercentage"),
    ({"teaCache": True, "cacheStartStep": 10}, "invalidCacheStartStep", "acceleratorOptions.cacheStartStep"),
    ({"fbCache": True, "cacheEndStep": 0}, "invalidCacheEndStep", "acceleratorOptions.cacheEndStep"),
    ({"fbCache": True, "cacheStartStep": -1}, "invalidCacheStartStep", "acceleratorOptions.cacheStartStep"),
    ({"dbCache": True, "cacheStartStepPercentage": 100}, "invalidCacheStartStepPercentage",
     "acceleratorOptions.cacheStartStepPercentage"),
    ({"dbCache": True, "dbCacheThreshold": 1.5}, "invalidDbCacheThreshold", "acceleratorOptions.dbCacheThreshold"),
    ({"dbCache": True, "dbCacheSkipInterval": 1.5}, "invalidDbCacheSkipInterval",
     "acceleratorOptions.dbCacheSkipInterval"),
    ({"teaCache": "yes"}, "invalidTeaCache", "acceleratorOptions.teaCache"),
    ({"teaCache": True, "cacheMaxConsecutiveSteps": 0}, "invalidCacheMaxConsecutiveSteps",
     "acceleratorOptions.cacheMaxConsecutiveSteps"),
    ({"deepCache": True}, "unsupportedDeepCache", "acceleratorOptions.deepCache"),
    ({"fbcache": True, "fbCache": False}, "conflictFbcache", "acceleratorOptions.fbcache"),
    ({"fbCache": True, "cacheStopStep": 4, "cacheEndStep": 5}, "conflictCacheStopStep",
     "acceleratorOptions.cacheStopStep"),
])
def test_each_option_is_validated(accel_server, options, code, parameter):
    err = only_error(post(accel_server, acceleratorOptions=options))
    assert (err["code"], err["parameter"]) == (code, parameter), err
    assert err["taskType"] == "imageInference" and err["message"]


@pytest.mark.parametrize("options", [
    {"teaCache": True, "teaCacheDistance": SKIPS, "cacheStartStepPercentage": 20, "cacheEndStepPercentage": 80},
    {"fbCache": True, "fbCacheThreshold": SKIPS, "cacheStartStep": 1, "cacheEndStep": 10},
    {"dbCache": True, "dbCacheThreshold": SKIPS, "dbCacheSkipInterval": 3, "cacheMaxConsecutiveSteps": 1},
    {"teaCache": True, "cacheStartStep": 2, "cacheEndStepPercentage": 50},  # mixed forms are fine when ordered
])
def test_accelerated_requests_over_http(accel_server, options):
    t = task(acceleratorOptions=options)
    item = only_item(accel_server.post([t], headers=HEADERS))
    assert item["taskUUID"] == t["taskUUID"] and item["imageURL"]
    line = [ln for ln in accel_server.log().splitlines() if t["taskUUID"] in ln and " done:" in ln]
    method = next(m for m in ("teaCache", "fbCache", "dbCache") if options.get(m)).lower()
    assert line and re.search(rf"passes cond \d+/10 uncond \d+/10 computed \({method}\)", line[-1]), line


def test_metrics_count_computed_and_skipped_passes(accel_server):
    before = passes(accel_server)
    only_item(post(accel_server, acceleratorOptions={"fbCache": True, "fbCacheThreshold": SKIPS}))
    only_item(post(accel_server))
    after = passes(accel_server)

    def moved(key):
        return after.get(key, 0) - before.get(key, 0)

    for branch in ("cond", "uncond"):
        assert moved(("fbcache", branch, "skipped")) > 0
        assert moved(("fbcache", branch, "computed")) + moved(("fbcache", branch, "skipped")) == 10
        assert (moved(("none", branch, "computed")), moved(("none", branch, "skipped"))) == (10, 0)


def test_over_websocket_and_deterministic(accel_server):
    client = Client(accel_server)
    try:
        client.auth()
        options = {"dbCache": True, "dbCacheThreshold": SKIPS, "cacheMaxConsecutiveSteps": 2}
        results = []
        for _ in range(2):
            t = task(acceleratorOptions=options, outputType="base64Data")
            client.send(t)
            frame = client.until(t["taskUUID"])
            [item] = frame["data"]
            results.append(item["imageBase64Data"])
        assert results[0] == results[1]
        plain = task(outputType="base64Data")
        client.send(plain)
        [item] = client.until(plain["taskUUID"])["data"]
        assert item["imageBase64Data"] != results[0]  # the cache did change the (tiny-model) image
    finally:
        client.close()


def test_the_official_sdk_sends_its_own_spelling(accel_server):
    from runware.types import IAcceleratorOptions

    async def body(rw):
        tea = await rw.imageInference(requestImage=request(acceleratorOptions=IAcceleratorOptions(
            teaCache=True, teaCacheDistance=0.4, cacheStartStepPercentage=10, cacheEndStepPercentage=90,
            cacheMaxConsecutiveSteps=2)))
        fb = await rw.imageInference(requestImage=request(acceleratorOptions=IAcceleratorOptions(
            fbcache=True, cacheDistance=SKIPS, cacheStartStep=1, cacheStopStep=9)))
        return tea, fb

    tea, fb = run(body, accel_server)
    assert len(tea) == 1 and len(fb) == 1
    logs = accel_server.log()
    assert re.search(rf"task {fb[0].taskUUID} done: .*\(fbcache\)", logs)
    assert re.search(rf"task {tea[0].taskUUID} done: .*\(teacache\)", logs)


def test_generate_stats(tmp_path, data_dir):
    out = tmp_path / "out"
    res = k5serve("generate", "--tiny", "--data-dir", str(data_dir), "--prompt", "a lighthouse at dusk",
                  "--steps", "10", "--seed", "4", "--accelerator-options",
                  json.dumps({"teaCache": True, "teaCacheDistance": SKIPS}), "--stats", "--out", str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "results.json").read_text())
    [stats] = result["stats"]
    assert stats["taskUUID"] == result["data"][0]["taskUUID"] and len(stats["stepSeconds"]) == 10
    passes_ = stats["transformerPasses"]
    assert passes_["method"] == "teacache" and passes_["skipped"] > 0
    assert {b: v["computed"] + v["skipped"] for b, v in passes_["branches"].items()} == {"cond": 10, "uncond": 10}
    res = k5serve("generate", "--tiny", "--data-dir", str(data_dir), "--prompt", "a lighthouse at dusk",
                  "--steps", "10", "--out", str(tmp_path / "plain"))
    assert "stats" not in json.loads((tmp_path / "plain" / "results.json").read_text())


def test_calibrate_command(tmp_path, data_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na lighthouse at dusk\n")
    out = tmp_path / "tc.json"
    res = k5serve("calibrate", "teacache", "--tiny", "--data-dir", str(data_dir), "--prompts", str(prompts),
                  "--steps", "6", "--size", "256x256", "--out", str(out))
    assert res.returncode == 0, res.stderr
    fitted = json.loads(out.read_text())
    assert len(fitted["coefficients"]) == 5 and fitted["runs"] == 2 and fitted["samples"] == 20
    # The file is what --teacache-coefficients takes.
    res = k5serve("generate", "--tiny", "--data-dir", str(data_dir), "--prompt", "a cat", "--steps", "10",
                  "--teacache-coefficients", str(out), "--accelerator-options", '{"teaCache": true}', "--stats",
                  "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "o" / "results.json").read_text())["stats"]
    assert stats[0]["transformerPasses"]["method"] == "teacache"




def test_a_bad_coefficients_file_is_refused_at_start(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"coefficients": []}')
    res = k5serve("serve", "--tiny", "--data-dir", str(tmp_path), "--teacache-coefficients", str(bad))
    assert res.returncode == 2 and "--teacache-coefficients" in res.stderr
