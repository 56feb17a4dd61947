"""Image-to-image and instruction editing through HTTP, with every input form and the safety limits."""

from __future__ import annotations

import base64
import io
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from conftest import task
from PIL import Image
from test_http_api import only_item

RNG = np.random.default_rng(0)


def encoded(size=(300, 200), fmt="PNG", exif_orientation=None) -> bytes:
    pixels = RNG.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, format=fmt, exif=exif)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def data_uri(blob: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(blob).decode()


def pixels_of(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"]))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def img_server(start_server):
    return start_server("--allow-private-urls", "--max-image-bytes", "2000000", "--max-image-pixels", "25000000")


def one(srv, **fields) -> dict:
    resp = srv.post([task(outputType="base64Data", outputFormat="PNG", **fields)])
    assert resp.status_code == 200, resp.text
    [item] = resp.json()["data"]
    return item


def error(srv, **fields) -> dict:
    resp = srv.post([task(**fields)])
    assert resp.status_code == 400, resp.text
    [err] = resp.json()["errors"]
    return err


def test_editing_without_size_snaps_to_the_nearest_allowed_size(img_server):
    item = one(img_server, width=..., height=..., positivePrompt="make it night",
               inputs={"referenceImages": [data_uri(encoded((300, 200)))]})
    assert (item["width"], item["height"]) == (1280, 768)
    assert pixels_of(item).shape == (768, 1280, 3)


def test_editing_input_forms_and_that_the_image_matters(img_server):
    blob = encoded((256, 256))
    by_uri = one(img_server, inputs={"referenceImages": [data_uri(blob)]})
    by_b64 = one(img_server, inputs={"image": base64.b64encode(blob).decode()})
    up = img_server.post([{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(blob)}])
    [uploaded] = up.json()["data"]
    by_uuid = one(img_server, referenceImages=[uploaded["imageUUID"]])
    by_url = one(img_server, referenceImages=[uploaded["imageURL"]])
    base = pixels_of(by_uri)
    for other in (by_b64, by_uuid, by_url):
        assert np.abs(pixels_of(other) - base).max() <= 1
    different = one(img_server, inputs={"referenceImages": [data_uri(encoded((256, 256)))]})
    assert np.abs(pixels_of(different) - base).mean() > 0.5
    t2i = one(img_server)
    assert np.abs(pixels_of(t2i) - base).mean() > 0.5


def test_generated_image_uuid_is_an_input(img_server):
    [gen] = img_server.post([task(seed=3, outputFormat="JPG")]).json()["data"]  # small enough for the limit
    edited = one(img_server, inputs={"referenceImages": [gen["imageUUID"]]})
    assert edited["imageUUID"] != gen["imageUUID"]


def test_seed_image_and_strength(img_server):
    seed_image = data_uri(encoded((512, 512)))
    low = one(img_server, seedImage=seed_image, strength=0.3)
    high = one(img_server, seedImage=seed_image, strength=0.9)
    again = one(img_server, seedImage=seed_image, strength=0.3)
    assert np.array_equal(pixels_of(low), pixels_of(again))
    assert np.abs(pixels_of(low) - pixels_of(high)).mean() > 0.5
    # strength 0 runs no step: the result is the encoded image, whatever the seed
    zero_a = one(img_server, seedImage=seed_image, strength=0.0, seed=1)
    zero_b = one(img_server, seedImage=seed_image, strength=0.0, seed=2)
    assert np.array_equal(pixels_of(zero_a), pixels_of(zero_b))
    t2i = one(img_server)
    assert np.abs(pixels_of(high) - pixels_of(t2i)).mean() > 0.1


def test_seed_image_follows_requested_size(img_server):
    item = one(img_server, seedImage=data_uri(encoded((400, 400))), width=640, height=1408)
    assert pixels_of(item).shape == (1408, 640, 3) and "width" not in item


def test_exif_orientation_is_honoured(img_server):
    # Stored 400x200 (landscape) with "rotate 90" in EXIF: the image really is portrait.
    item = one(img_server, width=..., height=..., inputs={"referenceImages": [
        data_uri(encoded((400, 200), fmt="JPEG", exif_orientation=6), "image/jpeg")]})
    assert item["height"] > item["width"]


@pytest.mark.parametrize("fields,code,parameter", [
    ({"seedImage": "data:image/png;base64,%%%"}, "invalidSeedImage", "seedImage"),
    ({"seedImage": base64.b64encode(b"GIF89a but not really").decode()}, "invalidSeedImage", "seedImage"),
    ({"inputs": {"referenceImages": [str(uuid.uuid4())]}}, "invalidReferenceImages", "inputs.referenceImages[0]"),
    ({"inputs": {"image": "https://"}}, "invalidImage", "inputs.image"),
    ({"referenceImages": ["a", "b"]}, "invalidReferenceImages", "referenceImages[1]"),
    ({"maskImage": "abcd"}, "unsupportedMaskImage", "maskImage"),
    ({"seedImage": "abcd", "referenceImages": ["abcd"]}, "conflictImageInputs", "seedImage"),
])
def test_bad_image_inputs(img_server, fields, code, parameter):
    err = error(img_server, **fields)
    assert (err["code"], err["parameter"]) == (code, parameter), err


def test_size_limits_apply_before_decoding(img_server):
    big = base64.b64encode(b"\0" * 2_100_000).decode()
    err = error(img_server, seedImage=big)
    assert err["code"] == "invalidSeedImage" and "larger than" in err["message"]
    # A decompression bomb: a small PNG that claims 6000x6000 pixels (over the 25 Mpx limit).
    bomb = io.BytesIO()
    Image.new("1", (6000, 6000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 2_000_000
    err = error(img_server, seedImage=data_uri(bomb.getvalue()))
    assert err["code"] == "invalidSeedImage" and "pixels" in err["message"]


def test_private_urls_refused_by_default(server):
    resp = server.post([task(referenceImages=[f"{server.url}/health"])])
    [err] = resp.json()["errors"]
    assert err["code"] == "invalidReferenceImages" and "loopback" in err["message"]


def test_editing_refused_when_no_editing_model(start_server):
    srv = start_server("--i2i-model", "none", "--allow-private-urls")
    err = error(srv, referenceImages=[data_uri(encoded())])
    assert err["code"] == "unsupportedReferenceImages"
    assert httpx.get(srv.url + "/health").json()["i2i_model"] is None
    # Refused before the image is fetched: a reference image by URL is never downloaded.
    blob, fetched = encoded(), []

    class Images(BaseHTTPRequestHandler):
        def do_GET(self):
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, *args):
            pass

    images = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{images.server_port}/ref.png"
        for where in ({"referenceImages": [url]}, {"inputs": {"referenceImages": [url]}}, {"inputs": {"image": url}}):
            err = error(srv, **where)
            assert err["code"] == "unsupportedReferenceImages" and "--i2i-model" in err["message"], err
        assert fetched == []
        assert only_item(srv.post([task(seedImage=url, strength=0.5)]))["imageUUID"]  # image-to-image still works
        assert fetched == ["/ref.png"]
    finally:
        images.shutdown()


# --- the shapes newer clients send (server/protocol/client_shapes.py) ------------------------------------------


def test_the_clis_input_image_is_the_seed_image(img_server):
    """The Runware CLI sends image-to-image as inputImage + strength: the same image as seedImage, not a
    text-to-image that drops the input."""
    seed_image = data_uri(encoded((512, 512)))
    as_cli = one(img_server, inputImage=seed_image, strength=0.3)
    as_page = one(img_server, seedImage=seed_image, strength=0.3)
    assert np.array_equal(pixels_of(as_cli), pixels_of(as_page))
    assert np.abs(pixels_of(as_cli) - pixels_of(one(img_server))).mean() > 0.1
    err = error(img_server, inputImage=seed_image, seedImage=data_uri(encoded((64, 64))))
    assert err["code"] == "conflictImageInputs" and err["parameter"] == "inputImage"


def test_reference_image_objects_from_the_python_sdk(img_server):
    """runware's IInputReference goes out as {"image", "role", "tag", "type"}: the same edit as the plain string;
    a per-reference strength is refused by name, as is a key no client sends."""
    from runware import IImageInference, IInputReference, IInputs
    from test_sdk import run

    blob = data_uri(encoded((256, 256)))
    plain = one(img_server, seed=9, inputs={"referenceImages": [blob]})

    async def body(rw):
        return await rw.imageInference(requestImage=IImageInference(
            model=task()["model"], positivePrompt=task()["positivePrompt"], steps=10, seed=9, outputType="base64Data",
            outputFormat="PNG", inputs=IInputs(referenceImages=[IInputReference(image=blob, role="subject",
                                                                                refType="style")])))

    [image] = run(body, img_server, key="any")
    assert base64.b64decode(image.imageBase64Data) == base64.b64decode(plain["imageBase64Data"])
    err = error(img_server, inputs={"referenceImages": [{"image": blob, "strength": 0.5}]})
    assert err["code"] == "unsupportedReferenceImages" and err["parameter"] == "inputs.referenceImages[0].strength"
    err = error(img_server, referenceImages=[{"image": blob, "weight": 1}])
    assert err["code"] == "invalidReferenceImages" and err["parameter"] == "referenceImages[0].weight"


@pytest.mark.parametrize("fields, code, parameter", [
    ({"controlNet": [{"model": "x", "guideImage": "y"}]}, "unsupportedControlNet", "controlNet"),
    ({"advancedFeatures": {"hiresFix": True}}, "unsupportedAdvancedFeatures", "advancedFeatures.hiresFix"),
    ({"inputs": {"images": ["y"]}}, "unsupportedInputs", "inputs.images"),
    ({"promptWeighting": "compel"}, "unsupportedPromptWeighting", "promptWeighting"),
])
def test_features_of_other_models_are_refused_by_name(img_server, fields, code, parameter):
    err = error(img_server, **fields)
    assert err["code"] == code and err["parameter"] == parameter


def test_fields_without_meaning_here_are_ignored_and_unknown_ones_logged_once(img_server):
    one(img_server, routing={"region": "eu"}, providerSettings={"bfl": {}}, advancedFeatures={"layerDiffuse": False},
        usePromptWeighting=False, acceleration="none", safety={"tolerance": True})
    for _ in range(2):
        one(img_server, someFieldNoClientSends=1, acceleratorOptions={"anotherOne": 2})
    log = img_server.log()
    assert log.count("'someFieldNoClientSends' is not known to this server") == 1
    assert log.count("'acceleratorOptions.anotherOne' is not known") == 1
    assert "routing" not in log and "providerSettings" not in log
