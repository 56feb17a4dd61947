"""The playground page (`GET /`), the queue view (`GET /queue`) and the API page (`GET /docs`), driven in a real
browser: Playwright for Python with Debian's Chromium, headless, against the real server on tiny weights, with API
keys and a LoRA folder.

Screenshots of the main states are written to `test-artifacts/playground/` (or `$K5SERVE_TEST_ARTIFACTS`).
The tests of one module share one page and run in order: each generation takes seconds on the CPU.
"""

from __future__ import annotations

import io
import os
import re
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import API_KEY, ROOT, task
from PIL import Image
from safetensors.torch import save_file
from test_lora import ATTN, peft_lora

CHROMIUM = os.environ.get("K5SERVE_CHROMIUM", "/usr/bin/chromium")
# As root there is no sandbox; this machine has no network, so Chromium's own background calls are switched off.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-default-apps", "--disable-gpu"]
ARTIFACTS = Path(os.environ.get("K5SERVE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "playground"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def srv(start_server, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("playground-loras")
    save_file(peft_lora(ATTN, seed=3), lora_dir / "watercolor.safetensors")
    save_file(peft_lora(ATTN, seed=4), lora_dir / "civitai:42@7.safetensors")
    (lora_dir / "notes.txt").write_text("not a LoRA")
    return start_server("--api-key", API_KEY, "--lora-dir", str(lora_dir), "--image-ttl", "3600")


def shot(page, name: str, **kw) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), **kw)


# -- the endpoints the page reads, without a browser ---------------------------------------------------------


def test_tasks_lists_queued_and_running_tasks_by_prefix_and_needs_the_key(srv):
    refused = httpx.get(srv.url + "/tasks")
    assert refused.status_code == 401 and refused.json()["errors"][0]["code"] == "invalidApiKey"
    wrong = httpx.get(srv.url + "/tasks", headers={"Authorization": "Bearer wrong-key"})
    assert wrong.status_code == 401 and wrong.json()["errors"][0]["code"] == "invalidApiKey"
    before = httpx.get(srv.url + "/tasks", headers=AUTH).json()

    first, second = task(deliveryMethod="async", steps=12), task(deliveryMethod="async", steps=10, width=640,
                                                                   height=1408, numberResults=2)
    assert srv.post([first, second], headers=AUTH).status_code == 200
    deadline, seen = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        body = httpx.get(srv.url + "/tasks", headers=AUTH).json()
        rows = {row["id"]: row for row in body["tasks"]}
        a, b = rows.get(first["taskUUID"][:8]), rows.get(second["taskUUID"][:8])
        if a and b and a["status"] == "running" and a["step"] > 0:
            seen = body
            break
        time.sleep(0.2)
    assert seen is not None, "the first task was never listed as running with both listed"
    rows = {row["id"]: row for row in seen["tasks"]}
    a, b = rows[first["taskUUID"][:8]], rows[second["taskUUID"][:8]]
    assert a["steps"] == 12 and 0 < a["step"] <= 12 and "position" not in a
    assert b == b | {"status": "queued", "position": 1, "width": 640, "height": 1408, "numberResults": 2, "steps": 10}
    assert seen["running"] == 1 and seen["queued"] == 1 and seen["queueLimit"] == 64
    assert all(len(row["id"]) == 8 for row in seen["tasks"])
    assert first["taskUUID"] not in str(seen) and "red fox" not in str(seen)  # no whole UUIDs, no prompts

    for t in (first, second):  # finish both
        reply = srv.post([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}], headers=AUTH, timeout=120)
        while any(item.get("status") == "processing" for item in reply.json().get("data", [])):
            reply = srv.post([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}], headers=AUTH, timeout=120)
        assert reply.status_code == 200, reply.text
    after = httpx.get(srv.url + "/tasks", headers=AUTH).json()
    assert after["tasks"] == [] and after["running"] == after["queued"] == 0
    assert after["tasksCompleted"] == before["tasksCompleted"] + 2
    assert after["imagesGenerated"] == before["imagesGenerated"] + 3


def test_model_search_lists_the_lora_folder(srv):
    def search(**fields) -> dict:
        reply = srv.post([{"taskType": "modelSearch", "taskUUID": str(uuid.uuid4()), **fields}], headers=AUTH)
        assert reply.status_code == 200, reply.text
        return reply.json()["data"][0]

    loras = search(category="lora")
    assert [m["air"] for m in loras["results"]] == ["civitai:42@7", "watercolor"]  # sorted; notes.txt is no LoRA
    assert all(m["category"] == "lora" and m["architecture"] == "kandinsky5" for m in loras["results"])
    assert [m["air"] for m in search(category="checkpoint")["results"]] == ["runware:kandinsky-5.0-image-lite@1"]
    assert search()["totalResults"] == 3
    assert [m["air"] for m in search(search="water")["results"]] == ["watercolor"]
    assert search(category="controlnet")["totalResults"] == 0


def test_the_page_is_served_from_here_with_a_strict_policy(srv):
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "http" not in page.text.split("<body>")[0]  # no asset from elsewhere
    for asset in ("app.css", "common.js", "playground.js", "queue.js", "api.js"):
        reply = httpx.get(f"{srv.url}/playground/{asset}")
        assert reply.status_code == 200 and not re.search(r"https?://", reply.text), asset
    assert "content-security-policy" in httpx.get(srv.url + "/queue").headers
    docs = httpx.get(srv.url + "/docs")  # the API page: our own, no Swagger UI from a CDN
    assert docs.status_code == 200 and docs.headers["content-security-policy"] == policy
    assert "http" not in docs.text and "/playground/api.js" in docs.text
    for outside in ("index.html", "%2e%2e/index.html", "%2e%2e/%2e%2e/playground.py", "..%2f..%2fapp.py"):
        assert httpx.get(f"{srv.url}/playground/{outside}").status_code == 404, outside  # pages only with their CSP
    forged = httpx.get(srv.url + "/", headers={"Host": "evil; script-src *"}).headers["content-security-policy"]
    assert "evil" not in forged and "script-src *" not in forged
    total = sum(len(httpx.get(f"{srv.url}/playground/{a}").content) for a in ("app.css", "common.js", "playground.js"))
    assert len(page.content) + total < 120_000  # small: no framework, no build


# -- in the browser ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does) or set K5SERVE_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Visits:
    """Every URL the browser asked for (pages, assets, images, WebSockets)."""

    def __init__(self):
        self.urls: list[str] = []

    def watch(self, context) -> None:
        context.on("request", lambda request: self.urls.append(request.url))
        context.on("page", lambda page: page.on("websocket", lambda ws: self.urls.append(ws.url)))


@pytest.fixture(scope="module")
def visits():
    return Visits()


def open_tab(browser, srv, visits, width: int, height: int):
    """A new window of its own (its own session storage) on the playground; the page's JavaScript errors are
    collected in `page.js_errors`. -> (context, page)."""
    context = browser.new_context(viewport={"width": width, "height": height}, color_scheme="light")
    visits.watch(context)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.goto(srv.url + "/")
    page.js_errors = errors
    return context, page


@pytest.fixture(scope="module")
def page(browser, srv, visits):
    context, page = open_tab(browser, srv, visits, 1280, 900)
    yield page
    context.close()


def set_value(page, selector: str, value) -> None:
    """A range or number input set as the user would leave it (input and change events fire)."""
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input', {bubbles: true}));"
                                    " e.dispatchEvent(new Event('change', {bubbles: true})); }", str(value))


def open_section(page, section: str) -> None:
    page.eval_on_selector(f"#{section}", "details => details.open = true")


def generate(page, how: str = "click"):
    """Send the form; -> the new task's card (an image input is uploaded first, so the card comes a little later)."""
    before = page.locator(".task").count()
    if how == "click":
        page.click("#generate")
    else:
        page.locator("#positivePrompt").press(how)
    page.wait_for_function(f"() => document.querySelectorAll('.task').length > {before}")
    return page.locator(f".task[data-task='{page.locator('.task').first.get_attribute('data-task')}']")


def wait_done(page, card, count: int) -> set[str]:
    """Wait until `card` (a task in the gallery) shows `count` images; -> the progress texts seen on the way."""
    seen: set[str] = set()
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        seen.add(card.locator(".state").inner_text())
        if card.get_attribute("data-status") == "error":
            raise AssertionError(f"the task failed: {card.locator('.state').inner_text()}")
        if card.locator(".tile img").count() >= count and card.get_attribute("data-status") == "done":
            return seen
        time.sleep(0.1)
    raise AssertionError(f"no {count} images after {TIMEOUT_MS / 1000} s; saw {seen}")


# Whether an element is wholly inside the window and not covered (the point at its centre is it or inside it).
IN_VIEW = """e => {
  const r = e.getBoundingClientRect(), hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return r.width > 0 && r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth
    && !!hit && (hit === e || e.contains(hit));
}"""

# What is cut off on the page: a select whose chosen text is wider than its box, an element whose content overflows
# a box that clips or scrolls it sideways, an element sticking out of its panel, a page wider than the window.
CUT_OFF = """() => {
  const out = [], ctx = document.createElement("canvas").getContext("2d");
  for (const e of document.querySelectorAll("body *")) {
    const r = e.getBoundingClientRect(), style = getComputedStyle(e);
    if (!r.width || !r.height || style.visibility === "hidden" || e.closest("dialog:not([open])")) continue;
    const name = [e.tagName.toLowerCase(), e.id && `#${e.id}`, ...[...e.classList].map((c) => `.${c}`)].join("");
    if (e.tagName === "SELECT") {
      ctx.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
      const text = e.selectedOptions[0]?.text || "";
      const room = e.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 20;  // the arrow
      if (ctx.measureText(text).width > room) out.push(`${name}: "${text}" is wider than its ${Math.floor(room)} px`);
      continue;
    }
    if (["INPUT", "TEXTAREA", "IMG"].includes(e.tagName)) continue;
    if (e.clientWidth && e.scrollWidth > e.clientWidth + 1 && style.overflowX !== "visible") {
      out.push(`${name}: ${e.scrollWidth} px of content in ${e.clientWidth} px`);
    }
    const box = e.parentElement?.closest(".panel, .task, .notice, .topbar, dialog");
    const b = box?.getBoundingClientRect();
    if (b && (r.left < b.left - 1 || r.right > b.right + 1)) out.push(`${name} sticks out of its ${box.className}`);
  }
  const width = document.documentElement.scrollWidth;
  if (width > innerWidth) out.push(`the page is ${width} px wide`);
  return out;
}"""


def in_view(page, selector: str) -> bool:
    return page.eval_on_selector(selector, IN_VIEW)


def open_everything(page) -> None:
    """Every section of the form open, with its longest content (the DBCache options, the longest scheduler)."""
    for section in ("image-input", "lora-section", "cache-section", "output-section"):
        open_section(page, section)
    page.check("input[name=imageMode][value=seed]")
    page.select_option("#cacheMethod", "dbCache")


def close_everything(page) -> None:
    page.check("input[name=imageMode][value=none]")
    page.select_option("#cacheMethod", "")
    for section in ("image-input", "lora-section", "cache-section", "output-section"):
        page.eval_on_selector(f"#{section}", "details => details.open = false")


def assert_nothing_cut_off(page) -> None:
    assert page.evaluate(CUT_OFF) == []
    open_everything(page)
    for scheduler in ("", "DPM++ 2M SDE Exponential"):
        page.select_option("#scheduler", scheduler)
        assert page.evaluate(CUT_OFF) == [], scheduler
    page.select_option("#scheduler", "")
    close_everything(page)


def test_a_wrong_key_is_refused_plainly_and_the_right_one_connects(page):
    page.wait_for_selector("#key-dialog[open]")
    assert "asks for an API key" in page.inner_text("#key-message")
    page.fill("#key-input", "not-the-key")
    page.click("#key-save")
    page.wait_for_function("() => document.getElementById('key-message').textContent.includes('invalidApiKey')")
    assert page.inner_text("#connection") == "API key needed"
    shot(page, "01-api-key")
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    page.wait_for_selector("#connection[data-state=connected]")
    assert page.evaluate("sessionStorage.getItem('k5serve.apiKey')") == API_KEY
    assert page.evaluate("localStorage.length") == 0
    assert API_KEY not in page.url


def test_two_images_appear_with_progress(page):
    page.fill("#positivePrompt", "a lighthouse on a cliff at dusk")
    page.fill("#numberResults", "2")
    set_value(page, "#steps", 10)
    page.click(".size:has(input[value='1152x896'])")
    card = generate(page, "Control+Enter")  # the keyboard shortcut
    seen = wait_done(page, card, 2)
    assert any(text.startswith("step ") and text != "step 0 of 10" for text in seen), seen  # step k of N
    assert card.locator(".progress .bar").evaluate("e => e.style.width") == "100%"
    captions = card.locator("figcaption").all_inner_texts()
    seeds = [int(c.split()[1]) for c in captions]
    assert seeds[1] == seeds[0] + 1 and all("1152×896" in c for c in captions)
    for img in card.locator(".tile img").all():
        assert img.evaluate("e => e.complete && e.naturalWidth") == 1152
    assert card.locator(".state").inner_text().startswith("done in")
    shot(page, "02-two-images", full_page=True)
    assert page.js_errors == []


def test_errors_show_next_to_their_parameter(page):
    page.fill("#positivePrompt", "x")
    count = page.locator(".task").count()
    page.click("#generate")
    slot = page.locator(".field-error[data-for=positivePrompt]")
    assert "2 to 32000 characters" in slot.inner_text()  # the page's own check: nothing was sent
    assert page.locator(".task").count() == count
    shot(page, "03-page-check")

    open_section(page, "output-section")
    page.check("#skip-checks")  # send it anyway: the server's own error is shown next to the prompt
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('.field-error[data-for=positivePrompt]').textContent"
                           ".includes('invalidPositivePrompt')")
    assert page.locator(".task").count() == count + 1
    failed = page.locator(".task").first  # a server error comes back at once: no task was queued
    assert failed.get_attribute("data-status") == "error" and "invalidPositivePrompt" in failed.inner_text()
    assert page.get_attribute("#positivePrompt", "aria-invalid") == "true"

    page.fill("#positivePrompt", "a lighthouse")
    set_value(page, "#steps", 10)
    page.fill("#numberResults", "1")
    open_section(page, "lora-section")
    page.select_option("#lora-pick", "civitai:42@7")  # from modelSearch: the server's LoRA folder
    page.click("#lora-add")
    page.eval_on_selector("#loras .lora", "row => row.dataset.model = 'missing-lora'")  # gone from the folder
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('.field-error[data-for=lora]').textContent"
                           ".includes('not found')")
    shot(page, "04-server-error", full_page=True)
    page.click("#loras .lora button")
    page.uncheck("#skip-checks")


def test_reuse_settings_fills_the_form_and_the_gallery_survives_a_reload(page):
    page.fill("#positivePrompt", "a <b>teapot</b>, watercolor")
    page.fill("#negativePrompt", "blurry")
    set_value(page, "#steps", 11)
    set_value(page, "#CFGScale", 5.5)
    page.select_option("#scheduler", "DPM++ 2M Karras")
    page.click(".size:has(input[value='640x1408'])")
    page.select_option("#lora-pick", "watercolor")
    page.click("#lora-add")
    set_value(page, "#loras .lora input", 0.75)
    open_section(page, "cache-section")
    page.select_option("#cacheMethod", "teaCache")
    page.check("#includeCost")
    card = generate(page)
    wait_done(page, card, 1)
    caption = card.locator("figcaption").inner_text()
    seed = int(caption.split()[1])
    assert "$" in caption  # includeCost

    page.fill("#positivePrompt", "something else entirely")
    page.fill("#negativePrompt", "")
    page.click("#loras .lora button")
    page.select_option("#cacheMethod", "")
    page.click(".size:has(input[value='1024x1024'])")
    card.locator(".tile .open").click()
    page.wait_for_selector("#viewer[open]")
    assert page.get_attribute("#viewer-download", "href") == card.locator(".tile img").get_attribute("src")
    shot(page, "05-viewer")
    page.click("#viewer-reuse")
    assert page.input_value("#positivePrompt") == "a <b>teapot</b>, watercolor"
    assert card.locator(".prompt").inner_text() == "a <b>teapot</b>, watercolor"  # text, never markup
    assert page.input_value("#negativePrompt") == "blurry"
    assert page.input_value("#steps") == "11" and page.input_value("#CFGScale") == "5.5"
    assert page.input_value("#scheduler") == "DPM++ 2M Karras"
    assert page.is_checked(".size input[value='640x1408']")
    assert page.is_checked("input[name=seedMode][value=fixed]") and page.input_value("#seed") == str(seed)
    assert page.locator("#loras .lora").get_attribute("data-model") == "watercolor"
    assert page.input_value("#loras .lora input") == "0.75"
    assert page.input_value("#cacheMethod") == "teaCache" and page.is_checked("#includeCost")

    images = page.locator(".tile img").count()
    page.reload()
    page.wait_for_selector("#connection[data-state=connected]")
    assert page.locator(".tile img").count() == images
    page.wait_for_function("() => [...document.querySelectorAll('.tile img')].every(i => i.complete && i.naturalWidth)")
    assert page.input_value("#positivePrompt") == "a <b>teapot</b>, watercolor"  # the form too
    assert page.evaluate("sessionStorage.getItem('k5serve.apiKey')") == API_KEY  # no new prompt for the key
    assert not page.is_visible("#key-dialog")


def test_a_task_running_through_a_reload_still_arrives(page):
    page.fill("#positivePrompt", "a windmill in a storm")
    page.click("input[name=seedMode][value=random]")
    page.fill("#numberResults", "1")
    set_value(page, "#steps", 40)  # about 7 s here: the reload and reconnect must come well before the end
    card = generate(page)
    task_uuid = card.get_attribute("data-task")
    page.wait_for_function(f"() => document.querySelector(\".task[data-task='{task_uuid}'] .state\")"
                           ".textContent.startsWith('step')")
    page.reload()  # mid-generation: the card is restored and its result comes later
    page.wait_for_selector("#connection[data-state=connected]")
    card = page.locator(f".task[data-task='{task_uuid}']")
    assert card.get_attribute("data-status") != "done"
    wait_done(page, card, 1)
    assert page.locator(f".task[data-task='{task_uuid}'] .tile").count() == 1  # once, not twice


def test_a_duplicated_tab_works_on_its_own_session(page, srv):
    """A duplicated tab copies the tab's session storage, connectionSessionUUID included: the copy takes the
    session over, and the original, closed with 4001, opens a session of its own and still gets its task."""
    page.fill("#positivePrompt", "a lantern in the fog")
    page.fill("#numberResults", "1")
    set_value(page, "#steps", 40)
    card = generate(page)
    task_uuid = card.get_attribute("data-task")
    page.wait_for_function(f"() => document.querySelector(\".task[data-task='{task_uuid}'] .state\")"
                           ".textContent.startsWith('step')")
    session = page.evaluate("sessionStorage.getItem('k5serve.session')")
    stored = page.evaluate("JSON.stringify(Object.entries(sessionStorage))")
    copy = page.context.new_page()
    copy.set_default_timeout(TIMEOUT_MS)
    copy.add_init_script(f"for (const [k, v] of {stored}) sessionStorage.setItem(k, v);")
    try:
        copy.goto(srv.url + "/")
        copy.wait_for_selector("#connection[data-state=connected]")
        assert copy.evaluate("sessionStorage.getItem('k5serve.session')") == session  # the copy resumed it
        page.wait_for_function(f"() => sessionStorage.getItem('k5serve.session') !== '{session}'")
        page.wait_for_selector("#connection[data-state=connected]")
        wait_done(page, page.locator(f".task[data-task='{task_uuid}']"), 1)  # caught up on its own session
        assert page.locator(f".task[data-task='{task_uuid}'] .tile").count() == 1
        assert page.js_errors == []
    finally:
        copy.close()


def test_an_editing_request_with_an_uploaded_image_returns_an_image(page, tmp_path):
    source = tmp_path / "input.png"
    Image.new("RGB", (896, 1152), (200, 60, 30)).save(source)
    page.fill("#positivePrompt", "make it blue")
    page.click("input[name=seedMode][value=random]")
    for section in ("cache-section", "lora-section", "image-input"):
        open_section(page, section)
    page.select_option("#cacheMethod", "")
    page.fill("#numberResults", "1")
    set_value(page, "#steps", 10)
    if page.locator("#loras .lora").count():
        page.click("#loras .lora button")
    page.check("input[name=imageMode][value=edit]")
    page.set_input_files("#file", str(source))
    page.wait_for_function("() => document.getElementById('preview').naturalWidth === 896")  # previewed before sending
    page.click(".size.match")
    shot(page, "06-edit-input", full_page=True)
    card = generate(page)
    wait_done(page, card, 1)
    assert "896×1152" in card.locator("figcaption").inner_text()  # the size came from the input image
    assert "edit" in card.inner_text()
    shot(page, "07-edit-result", full_page=True)

    png = io.BytesIO()
    Image.new("RGB", (1024, 1024), (30, 90, 200)).save(png, format="PNG")
    (tmp_path / "seed.png").write_bytes(png.getvalue())
    page.check("input[name=imageMode][value=seed]")
    page.set_input_files("#file", str(tmp_path / "seed.png"))
    set_value(page, "#strength", 0.6)
    page.click(".size:has(input[value='1024x1024'])")
    card = generate(page)
    wait_done(page, card, 1)
    assert "img2img 0.6" in card.inner_text()
    assert page.js_errors == []


def test_queue_view_shows_the_server_and_its_tasks(page, srv):
    queue = page
    queue.click("a[href='/queue']")  # the same tab: the key is in its session storage
    queue.wait_for_selector("#readiness[data-state=ready]")
    facts = queue.inner_text("#facts")
    assert "cpu" in facts and "tiny test weights" in facts
    assert "CPU test mode" in queue.inner_text("#test-mode")  # here too
    # the page asks every 2 s, so the first task must stay running for several of its refreshes: 50 steps
    # (about 8 s here; 14 steps, about 2.5 s after its first progress report, were missed once in CI)
    first = task(deliveryMethod="async", steps=50)
    second = task(deliveryMethod="async", steps=10)
    assert srv.post([first, second], headers=AUTH).status_code == 200
    queue.wait_for_selector(f"tr[data-id='{first['taskUUID'][:8]}'][data-status=running]")
    queue.wait_for_selector(f"tr[data-id='{second['taskUUID'][:8]}'][data-status=queued]")
    assert "queued · position 1" in queue.inner_text(f"tr[data-id='{second['taskUUID'][:8]}']")
    shot(queue, "08-queue")
    queue.wait_for_selector("#idle:not([hidden])", timeout=180_000)  # it refreshes itself until both are done
    assert "images generated" in queue.inner_text("#counts")
    assert not queue.is_visible("#key-dialog")


# -- a new tab at 1280x800 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def desk(browser, srv, visits):
    """A new tab (its own session storage: no key yet) on a 1280x800 window."""
    context, page = open_tab(browser, srv, visits, 1280, 800)
    yield page
    context.close()


def test_enter_in_the_key_dialog_connects_and_the_test_mode_notice_shows(desk):
    desk.wait_for_selector("#key-dialog[open]")
    notice = desk.locator("#test-mode")  # --tiny: said loudly, on load
    notice.wait_for()
    text = notice.inner_text()
    assert "CPU test mode: images are noise from tiny random weights" in text
    assert "k5serve weights download" in text and "k5serve serve" in text and "steps: 10" in text
    assert re.search(r"seconds per image|s at 10 steps", text), text
    desk.fill("#key-input", API_KEY)
    desk.press("#key-input", "Enter")  # the form's implicit submission: Connect, not Cancel
    desk.wait_for_selector("#connection[data-state=connected]")
    assert desk.evaluate("sessionStorage.getItem('k5serve.apiKey')") == API_KEY
    assert notice.is_visible()

    desk.fill("#positivePrompt", "a harbour at night")
    set_value(desk, "#steps", 10)
    card = generate(desk)
    wait_done(desk, card, 1)
    assert "the last task here" in desk.inner_text("#test-mode-time")  # the time it measured
    desk.click("#test-mode button")
    assert not notice.is_visible()
    desk.reload()  # on every load
    desk.wait_for_selector("#connection[data-state=connected]")
    notice.wait_for()


def test_generate_is_in_view_with_its_shortcut_and_nothing_is_cut_off(desk):
    assert in_view(desk, "#generate")  # at 1280x800, without scrolling
    assert desk.inner_text("#generate .shortcut") in ("Ctrl+Enter", "⌘+Enter")
    assert desk.get_attribute("#generate", "aria-keyshortcuts") == "Control+Enter Meta+Enter"
    assert_nothing_cut_off(desk)
    desk.eval_on_selector("#form-body", "body => body.scrollTop = body.scrollHeight")
    assert in_view(desk, "#generate")
    shot(desk, "10-desk-1280x800")


def test_an_invalid_form_focuses_its_first_error_in_view(desk):
    desk.eval_on_selector("#form-body", "body => body.scrollTop = body.scrollHeight")  # the prompt scrolled away
    desk.fill("#positivePrompt", "")
    desk.eval_on_selector("#form-body", "body => body.scrollTop = body.scrollHeight")
    count = desk.locator(".task").count()
    desk.click("#generate")
    slot = ".field-error[data-for=positivePrompt]"
    assert "2 to 32000 characters" in desk.inner_text(slot)
    assert desk.evaluate("document.activeElement.id") == "positivePrompt"
    assert in_view(desk, slot) and in_view(desk, "#positivePrompt")
    assert desk.locator(".task").count() == count
    shot(desk, "11-desk-empty-prompt")

    desk.fill("#positivePrompt", "a harbour at night")  # a field further down, with the form scrolled to the top
    desk.fill("#numberResults", "0")
    desk.eval_on_selector("#form-body", "body => body.scrollTop = 0")
    desk.locator("#positivePrompt").press("Control+Enter")
    assert desk.evaluate("document.activeElement.id") == "numberResults"
    assert "Images: a whole number from 1 to 20" in desk.inner_text(".field-error[data-for=numberResults]")
    assert in_view(desk, ".field-error[data-for=numberResults]")  # not under the Generate bar
    desk.fill("#numberResults", "1")


def test_the_newest_image_is_large_with_its_facts_download_and_reuse(desk):
    older = desk.locator(f".task[data-task='{desk.locator('.task').first.get_attribute('data-task')}']")
    desk.fill("#positivePrompt", "a harbour at dawn")
    set_value(desk, "#steps", 20)
    desk.click(".size:has(input[value='1280x768'])")
    card = generate(desk)
    assert "latest" not in older.get_attribute("class")  # the task before is a thumbnail now
    assert older.locator(".tile img").bounding_box()["width"] < 300
    seen = wait_done(desk, card, 1)
    assert any(re.fullmatch(r"step \d+ of 20 · about \d+(\.\d)? s left", text) for text in seen), seen  # an ETA
    desk.wait_for_function("() => document.querySelector('.task.latest .tile img').complete")
    image = card.locator(".tile img")
    assert "latest" in card.get_attribute("class") and image.bounding_box()["width"] >= 400
    caption = card.locator("figcaption")
    assert re.match(r"seed \d+ · 1280×768 · \d+\.\d s", caption.inner_text())
    for action in (".download", ".reuse"):
        assert in_view(desk, f".task.latest {action}"), action  # at hand, without scrolling
    assert card.locator(".download").get_attribute("href") == image.get_attribute("src")
    assert card.locator(".download").get_attribute("download")
    shot(desk, "12-desk-newest-large")

    seed = caption.inner_text().split()[1]
    desk.fill("#positivePrompt", "something else")
    desk.click(".size:has(input[value='1024x1024'])")
    card.locator(".reuse").click()
    assert desk.input_value("#positivePrompt") == "a harbour at dawn"
    assert desk.is_checked("input[name=seedMode][value=fixed]") and desk.input_value("#seed") == seed
    assert desk.is_checked(".size input[value='1280x768']") and desk.input_value("#steps") == "20"
    assert desk.evaluate("document.activeElement.id") == "positivePrompt"
    assert desk.js_errors == []


def test_the_api_link_opens_a_readable_page(desk, srv):
    desk.click("#api-link")
    desk.wait_for_url(srv.url + "/docs")
    desk.wait_for_selector(".op")
    def text(selector: str) -> str:
        return " ".join(desk.inner_text(selector).split())

    assert not text("body").startswith("{")  # not the raw document
    assert text("#op-post--v1 h2") == "POST /v1 Run Runware tasks"
    assert "GET /tasks Tasks queued and running" in text("#api-toc")
    v1 = text("#op-post--v1")
    assert "Request body (required)" in v1 and "ImageInferenceTask" in v1 and "Responses" in v1 and "429" in v1
    assert "rateLimitExceeded" in v1 and '"positivePrompt": "a red fox in the snow"' in v1  # the example
    assert "Parameters Name In Type Required Description name path string yes" in text("#op-get--image-name-")
    task_fields = text("#schema-ImageInferenceTask")
    assert "positivePrompt" in task_fields and "2 to 32000 characters" in task_fields and "10 to 50" in task_fields
    assert "9223372036854775807" in task_fields  # the seed's maximum as written, past a JavaScript number's precision
    desk.click("#schema-ImageInferenceTask a[href='#schema-LoraItem']")
    assert in_view(desk, "#schema-LoraItem h3")
    assert desk.evaluate("document.documentElement.scrollWidth") <= 1280
    shot(desk, "13-api-page")
    assert desk.js_errors == []


def test_phone_width_and_dark_mode(browser, srv, visits):
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True)
    visits.watch(context)
    phone = context.new_page()
    phone.set_default_timeout(TIMEOUT_MS)
    phone.goto(srv.url + "/")
    phone.wait_for_selector("#key-dialog[open]")  # a new tab session: the key is asked again
    phone.fill("#key-input", "typed, then Escape")
    phone.keyboard.press("Escape")  # a cancel: nothing is stored, nothing is sent
    phone.wait_for_selector("#key-dialog", state="hidden")
    assert phone.evaluate("sessionStorage.getItem('k5serve.apiKey')") is None
    assert phone.inner_text("#connection") == "API key needed"
    phone.click("#change-key")
    phone.fill("#key-input", API_KEY)
    phone.click("#key-save")
    phone.wait_for_selector("#connection[data-state=connected]")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width} px)"
    background = phone.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(20, 23, 28)", background  # the dark palette
    assert phone.locator("#test-mode").is_visible()
    assert in_view(phone, "#generate")  # without scrolling: it sticks to the bottom of the window
    shot(phone, "09-phone-dark")
    assert_nothing_cut_off(phone)

    phone.evaluate("window.scrollTo(0, document.querySelector('#output-section').offsetTop)")  # the prompt out of view
    assert not in_view(phone, "#positivePrompt") and in_view(phone, "#generate")
    phone.click("#generate")  # the prompt is empty
    assert phone.evaluate("document.activeElement.id") == "positivePrompt"
    assert in_view(phone, ".field-error[data-for=positivePrompt]")
    shot(phone, "09-phone-empty-prompt")
    assert phone.locator(".task").count() == 0
    context.close()


def test_the_page_asked_nothing_of_any_other_host(visits, srv):
    assert visits.urls, "no request was recorded"
    own = urlsplit(srv.url).netloc
    elsewhere = [u for u in visits.urls if urlsplit(u).netloc != own and not u.startswith(("data:", "blob:"))]
    assert elsewhere == []
    assert any(u.startswith(f"ws://{own}/v1") for u in visits.urls)
