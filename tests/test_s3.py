"""Images in an S3-compatible bucket: moto's standalone S3 server (see s3server.py; there is no real S3 here)
driven by the real boto3 client, and two real k5serve front-ends on one PostgreSQL database and one bucket.
A streams images itself (--image-urls proxy) and keeps them 6 s; B hands out presigned URLs."""

from __future__ import annotations

import base64
import io
import time
from email.utils import parsedate_to_datetime

import httpx
import pytest
from conftest import RunningServer, own_data_dir, task
from pgserver import PostgresServer
from PIL import Image
from s3server import CREDENTIALS, S3Server
from test_http_api import only_error, only_item

pytest.importorskip("boto3")
pytest.importorskip("psycopg")

from k5serve.server.store.s3 import S3ImageStore  # noqa: E402

SHORT_TTL = 6  # seconds A keeps generated images


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    server = S3Server()
    for key, value in CREDENTIALS.items():
        monkeypatch_module.setenv(key, value)
    server.bucket("k5serve-images")
    yield server
    server.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    yield server
    server.close()


# --- the store, against the S3 server ---------------------------------------------------------------------


def test_store_put_read_expire_and_sweep(s3):
    store = S3ImageStore("s3://k5serve-images/unit", endpoint=s3.url)
    short, kept = store.put(b"short-lived", "png", 1.0), store.put(b"kept", "jpg", 600)
    assert store.read(short.image_uuid) == b"short-lived" and store.read(kept.image_uuid) == b"kept"
    found = store.lookup(kept.name)
    assert found.media_type == "image/jpeg" and found.size == 4 and b"".join(found.chunks) == b"kept"
    found.close()
    assert store.lookup("../unit/" + kept.name) is None and store.lookup(kept.image_uuid + ".gif") is None
    assert len(s3.keys("k5serve-images", "unit/.expiry/")) == 2  # the expiry index: one marker per image
    time.sleep(2.2)  # the TTL, and the index's whole second
    assert store.sweep() == 1
    assert s3.keys("k5serve-images", "unit/") == sorted([f"unit/{kept.name}", *s3.keys("k5serve-images",
                                                                                         "unit/.expiry/")])
    assert store.read(short.image_uuid) is None and store.lookup(short.name) is None
    store.delete(kept)
    assert s3.keys("k5serve-images", "unit/") == []


def test_an_unreachable_bucket_is_reported_with_the_reason(s3):
    missing = S3ImageStore("s3://no-such-bucket", endpoint=s3.url).status()
    assert missing["reachable"] is False and "no-such-bucket" in missing["problem"]
    down = S3ImageStore("s3://k5serve-images", endpoint="http://127.0.0.1:9").status()
    assert down["reachable"] is False and "EndpointConnectionError" in down["problem"]
    assert "127.0.0.1:9" in down["problem"]
    assert "k5serve-test-secret" not in down["problem"]


# --- two front-ends on one database and one bucket --------------------------------------------------------


def frontend(tmp_path_factory, data_dir, pg, s3, name: str, *extra: str) -> RunningServer:
    return RunningServer(own_data_dir(tmp_path_factory, data_dir, name), "--database", pg.url, "--image-store",
                         "s3://k5serve-images/served", "--s3-endpoint", s3.url, "--poll-wait", "0", *extra,
                         env=CREDENTIALS)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, data_dir, pg, s3):
    a = frontend(tmp_path_factory, data_dir, pg, s3, "s3-frontend-a", "--image-ttl", str(SHORT_TTL))
    b = frontend(tmp_path_factory, data_dir, pg, s3, "s3-frontend-b", "--image-urls", "presigned")
    yield a, b
    a.stop()
    b.stop()


def test_ready_reports_the_bucket(pair):
    body = httpx.get(pair[0].url + "/ready").json()
    assert body["ready"] is True
    assert body["imageStore"] == {"kind": "s3", "location": "s3://k5serve-images/served", "imageURLs": "proxy",
                                  "reachable": True}
    assert httpx.get(pair[1].url + "/ready").json()["imageStore"]["imageURLs"] == "presigned"


def test_image_urls_from_a_are_served_by_b_until_the_ttl(pair, s3):
    a, b = pair
    item = only_item(a.post([task()]))
    name = item["imageURL"].rsplit("/", 1)[1]
    assert item["imageURL"] == f"{a.url}/image/{name}"
    from_a, from_b = httpx.get(item["imageURL"]), httpx.get(f"{b.url}/image/{name}")
    assert from_a.status_code == from_b.status_code == 200 and from_a.content == from_b.content
    assert from_a.headers["content-type"] == "image/jpeg" and from_a.content[:3] == b"\xff\xd8\xff"
    made, date = (parsedate_to_datetime(from_b.headers[h]) for h in ("last-modified", "date"))
    assert made.timestamp() <= date.timestamp() + 1  # when it was made, not when it expires
    assert parsedate_to_datetime(from_b.headers["expires"]) > date
    assert f"served/{name}" in s3.keys("k5serve-images", "served/")
    time.sleep(SHORT_TTL + 1)
    for url in (item["imageURL"], f"{b.url}/image/{name}"):
        gone = httpx.get(url)
        assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "imageNotFound"
    assert f"served/{name}" not in s3.keys("k5serve-images", "served/")  # the object is gone too


def test_presigned_urls_point_at_the_bucket(pair, s3):
    _, b = pair
    item = only_item(b.post([task(outputFormat="PNG")]))
    assert item["imageURL"].startswith(f"{s3.url}/k5serve-images/served/{item['imageUUID']}.png?")
    assert "X-Amz-Signature=" in item["imageURL"] and "X-Amz-Expires=" in item["imageURL"]
    got = httpx.get(item["imageURL"])
    assert got.status_code == 200 and got.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert httpx.get(f"{b.url}/image/{item['imageUUID']}.png").content == got.content  # proxied too


def test_uploads_and_generated_images_are_inputs_on_either_front_end(pair):
    a, b = pair
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    upload = only_item(a.post([{"taskType": "imageUpload", "taskUUID": task()["taskUUID"],
                                "image": base64.b64encode(buf.getvalue()).decode()}]))
    edited = only_item(b.post([task(seedImage=upload["imageUUID"], strength=0.6)]))
    assert edited["imageUUID"] != upload["imageUUID"]
    generated = only_item(b.post([task()]))  # B's default TTL: a day
    again = only_item(a.post([task(referenceImages=[generated["imageUUID"]])]))
    assert again["imageUUID"]
    err = only_error(a.post([task(seedImage="00000000-0000-4000-8000-000000000000")]), 400)
    assert err["parameter"] == "seedImage" and "unknown or expired" in err["message"]


def test_losing_the_bucket_makes_ready_503_and_tasks_fail_clearly(pair, s3):
    """Last of the module: the bucket goes away under A (emptied and deleted), then comes back."""
    a, _ = pair
    client = s3.client()
    for key in s3.keys("k5serve-images"):
        client.delete_object(Bucket="k5serve-images", Key=key)
    client.delete_bucket(Bucket="k5serve-images")
    try:
        deadline = time.monotonic() + 30  # the probe's answer is kept for a second
        while (ready := httpx.get(a.url + "/ready")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert ready.status_code == 503 and ready.json()["imageStore"]["reachable"] is False
        assert any("s3://k5serve-images/served" in reason for reason in ready.json()["reasons"]), ready.json()
        err = only_error(a.post([task()]), 503)
        assert err["code"] == "serviceUnavailable" and err["taskUUID"]
        assert "image store is unavailable (storing an image failed: NoSuchBucket)" in err["message"]
        assert "s3://k5serve-images/served at http" in a.log()  # where, and S3's own words: in the log only
        assert "at http" not in err["message"]
    finally:
        s3.bucket("k5serve-images")
    deadline = time.monotonic() + 30
    while httpx.get(a.url + "/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert httpx.get(a.url + "/ready").status_code == 200
    only_item(a.post([task()]))
