"""server/outbound/ (safe_http.py, downloads.py, outbox.py): URL policy, pinned connections, image download limits and
the webhook/upload outbox.

Receivers are stdlib HTTP servers on 127.0.0.1 in threads; nothing leaves the machine. Tests that reach
them pass allow_private=True, or patch the resolver / policy to pretend a loopback address is public.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import sqlite3
import threading
import time

import pytest
from k5serve.server.outbound import safe_http
from k5serve.server.outbound.downloads import DownloadError, fetch_bytes
from k5serve.server.outbound.outbox import Outbox
from k5serve.server.outbound.safe_http import OutboundURLError, check_url

run = asyncio.run  # pytest-asyncio is not installed: each test drives its own event loop


class Receiver:
    """A threaded HTTP server on 127.0.0.1 that records requests and answers via `respond(handler, n)`.

    `respond` gets the request handler and the 1-based number of the request on this receiver; it writes
    the answer itself (see `answer`), or returns "drop" to close the connection without one.
    """

    def __init__(self, respond=None):
        self.requests: list[dict] = []
        self.respond = respond or (lambda h, n: answer(h, 200))
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver._lock:
                    receiver.requests.append(
                        {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
                    n = len(receiver.requests)
                try:
                    if receiver.respond(self, n) == "drop":
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address):
                pass  # clients that gave up on a slow answer are expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def answer(h, status: int, body: bytes = b"", headers: dict | None = None, length: bool = True):
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    if length:
        h.send_header("Content-Length", str(len(body)))
    else:
        h.send_header("Connection", "close")  # body delimited by closing the connection
        h.close_connection = True
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture
def receiver():
    created: list[Receiver] = []

    def make(respond=None) -> Receiver:
        r = Receiver(respond)
        created.append(r)
        return r

    yield make
    for r in created:
        r.close()


def until(predicate, timeout: float = 5.0):
    """Async: wait until predicate() is true (polling), or fail."""
    async def wait():
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.02)
    return wait()


# --- URL policy -------------------------------------------------------------------------------------

PRIVATE = [
    "http://127.0.0.1/hook", "http://localhost:8080/hook", "http://10.1.2.3/", "http://172.16.0.1/",
    "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/", "http://[::1]/", "http://[::ffff:127.0.0.1]/",
    "http://0.0.0.0/", "http://[fe80::1]/", "http://[fd00::1]/", "https://2130706433/", "http://100.64.0.1/",
]


@pytest.mark.parametrize("url", PRIVATE)
def test_policy_refuses_internal_addresses_unless_allowed(url):
    with pytest.raises(OutboundURLError, match="only public hosts") as exc:
        run(check_url(url, allow_private=False, purpose="webhookURL"))
    assert str(exc.value).startswith("webhookURL: ") and exc.value.purpose == "webhookURL"
    run(check_url(url, allow_private=True, purpose="webhookURL"))


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com/x", "scheme 'ftp'"), ("file:///etc/passwd", "scheme 'file'"),
    ("http:///path", "no host"), ("http://", "no host"), ("not a url", "scheme"),
])
def test_policy_refuses_bad_urls_even_when_private_allowed(url, message):
    for allow in (False, True):
        with pytest.raises(OutboundURLError, match=message):
            run(check_url(url, allow_private=allow, purpose="uploadEndpoint"))


def test_policy_allows_public_literal_without_connecting():
    run(check_url("http://93.184.216.34/hook?token=x", allow_private=False, purpose="webhookURL"))
    run(check_url("https://[2606:4700::1111]/", allow_private=False, purpose="webhookURL"))


def test_policy_refuses_if_any_resolved_address_is_internal(monkeypatch):
    async def resolve(host, port):
        return {"mixed.example": ["93.184.216.34", "10.0.0.1"], "ok.example": ["93.184.216.34"]}[host]
    monkeypatch.setattr(safe_http, "resolve", resolve)
    with pytest.raises(OutboundURLError, match="mixed.example resolves to 10.0.0.1"):
        run(check_url("https://mixed.example/x", allow_private=False, purpose="webhookURL"))
    run(check_url("https://ok.example/x", allow_private=False, purpose="webhookURL"))


def test_policy_unresolvable_host(monkeypatch):
    async def resolve(host, port):
        raise OSError("no such host")
    monkeypatch.setattr(safe_http, "resolve", resolve)
    with pytest.raises(OutboundURLError, match="could not be resolved"):
        run(check_url("https://nope.example/", allow_private=False, purpose="webhookURL"))


def test_redact_drops_credentials_and_query():
    assert safe_http.redact("https://user:pw@h.example:8443/p/q?X-Amz-Signature=s#f") == "https://h.example:8443/p/q"
    assert safe_http.redact("http://[::1]/x?token=t") == "http://[::1]/x"


# --- DNS rebinding: the connection goes to the address that was checked -----------------------------


def test_connection_is_pinned_to_the_checked_address_and_keeps_host_header(receiver, monkeypatch):
    r = receiver(lambda h, n: answer(h, 200, b"img", {"Content-Type": "image/png"}))
    seen = []

    async def resolve(host, port):
        seen.append(host)
        return ["127.0.0.1"]
    monkeypatch.setattr(safe_http, "resolve", resolve)
    body, ctype = run(fetch_bytes(f"http://images.example:{r.port}/a.png", allow_private=True, max_bytes=100))
    assert (body, ctype) == (b"img", "image/png")
    assert seen == ["images.example"]  # resolved once, by us, at connect time
    assert r.requests[0]["headers"]["Host"] == f"images.example:{r.port}"


def test_dns_rebinding_after_check_is_refused_at_connect(receiver, monkeypatch, tmp_path):
    r = receiver()
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])

    async def resolve(host, port):
        return next(answers)  # public when checked, loopback when the client connects
    monkeypatch.setattr(safe_http, "resolve", resolve)
    url = f"http://rebind.example:{r.port}/img.png"
    run(check_url(url, allow_private=False, purpose="seedImage"))
    with pytest.raises(OutboundURLError, match="loopback"):
        run(fetch_bytes(url, allow_private=False, max_bytes=100))

    async def webhook():
        box = Outbox(tmp_path / "outbox.db", allow_private=False, initial_delay=0.05, retry_for=5)
        await box.start()
        box.enqueue_webhook(url, {"x": 1})
        assert await box.flush(3)
        await box.close()
        return box.stats["webhook"]
    stats = run(webhook())
    assert stats == {"delivered": 0, "retried": 0, "failed": 1}  # refused at once, no retries
    assert r.requests == []


# --- image download ---------------------------------------------------------------------------------


def test_fetch_returns_body_and_content_type(receiver):
    r = receiver(lambda h, n: answer(h, 200, b"\x89PNG data", {"Content-Type": "image/png"}))
    assert run(fetch_bytes(r.url + "/x.png", allow_private=True, max_bytes=1000)) == (b"\x89PNG data", "image/png")
    with pytest.raises(OutboundURLError, match="loopback"):
        run(fetch_bytes(r.url + "/x.png", allow_private=False, max_bytes=1000))
    assert len(r.requests) == 1


def test_fetch_refuses_large_content_length_early(receiver):
    r = receiver(lambda h, n: answer(h, 200, b"x" * 5000))
    with pytest.raises(DownloadError, match="5000 bytes is more than the limit of 1000"):
        run(fetch_bytes(r.url, allow_private=True, max_bytes=1000))


def test_fetch_aborts_body_without_content_length_past_limit(receiver):
    def respond(h, n):
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        for _ in range(100):  # 100 KB without a Content-Length, read until the connection closes
            h.wfile.write(b"x" * 1024)
        h.close_connection = True
    r = receiver(respond)
    with pytest.raises(DownloadError, match="more than the limit of 10000 bytes"):
        run(fetch_bytes(r.url, allow_private=True, max_bytes=10_000))
    assert run(fetch_bytes(r.url, allow_private=True, max_bytes=200_000))[0] == b"x" * 102_400


def test_fetch_non_2xx(receiver):
    r = receiver(lambda h, n: answer(h, 404, b"nope"))
    with pytest.raises(DownloadError, match="HTTP 404"):
        run(fetch_bytes(r.url + "/missing?sig=secret", allow_private=True, max_bytes=100))


def test_fetch_total_timeout_even_when_bytes_trickle(receiver):
    def slow_headers(h, n):
        time.sleep(3)
        answer(h, 200, b"late")

    def trickle(h, n):
        h.send_response(200)
        h.send_header("Content-Length", "30")
        h.end_headers()
        for _ in range(30):  # each read is quick, the whole body takes 3 s
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.1)
    for respond in (slow_headers, trickle):
        r = receiver(respond)
        t0 = time.monotonic()
        with pytest.raises(DownloadError, match="longer than 0.6 s"):
            run(fetch_bytes(r.url, allow_private=True, max_bytes=100, timeout=0.6))
        assert time.monotonic() - t0 < 1.5


def test_fetch_follows_at_most_three_redirects(receiver):
    def respond(h, n):
        hops = int(h.path.split("/")[1])  # /<hops left>
        if hops:
            answer(h, 302, headers={"Location": f"/{hops - 1}"})
        else:
            answer(h, 200, b"done", {"Content-Type": "image/webp"})
    r = receiver(respond)
    assert run(fetch_bytes(r.url + "/3", allow_private=True, max_bytes=100)) == (b"done", "image/webp")
    with pytest.raises(DownloadError, match="more than 3 redirects"):
        run(fetch_bytes(r.url + "/4", allow_private=True, max_bytes=100))


def test_fetch_rechecks_each_redirect(receiver, monkeypatch):
    # Pretend 127.0.0.1 is public, so the first hop is allowed; the redirect to 127.0.0.2 must be refused.
    real = safe_http._refusal
    monkeypatch.setattr(safe_http, "_refusal", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    r = receiver(lambda h, n: answer(h, 302, headers={"Location": "http://127.0.0.2:9/inside"}))
    with pytest.raises(OutboundURLError, match="127.0.0.2 is a loopback address"):
        run(fetch_bytes(r.url + "/start", allow_private=False, max_bytes=100))
    with pytest.raises(OutboundURLError, match="scheme 'ftp'"):
        r.respond = lambda h, n: answer(h, 302, headers={"Location": "ftp://example.com/x"})
        run(fetch_bytes(r.url + "/start", allow_private=False, max_bytes=100))


# --- outbox -----------------------------------------------------------------------------------------


def test_webhook_retried_until_delivered_once(receiver, tmp_path):
    def respond(h, n):
        if n == 1:
            return answer(h, 500)
        if n == 2:
            return "drop"  # connection closed without an answer
        answer(h, 200)
    r = receiver(respond)
    body = {"data": [{"taskType": "imageInference", "taskUUID": "u-1", "imageUUID": "i-1", "cost": 0}]}

    async def main():
        box = Outbox(tmp_path / "outbox.db", allow_private=True, initial_delay=0.05, retry_for=5)
        await box.start()
        box.enqueue_webhook(r.url + "/hook?token=secret", body)
        assert await box.flush(5)
        await box.close()
        return box.stats
    stats = run(main())
    assert stats["webhook"] == {"delivered": 1, "retried": 2, "failed": 0}
    assert len(r.requests) == 3
    for req in r.requests:
        assert req["method"] == "POST" and req["path"] == "/hook?token=secret"
        assert req["headers"]["Content-Type"] == "application/json"
        assert json.loads(req["body"]) == body


def test_upload_is_a_put_of_the_raw_bytes(receiver, tmp_path):
    r = receiver()
    data = bytes(range(256)) * 40

    async def main():
        box = Outbox(tmp_path / "outbox.db", allow_private=True)
        await box.start()
        box.enqueue_upload(r.url + "/bucket/img.png?X-Amz-Signature=abc", data, "image/png")
        assert await box.flush(5)
        await box.close()
        return box.stats
    assert run(main())["upload"] == {"delivered": 1, "retried": 0, "failed": 0}
    (req,) = r.requests
    assert req["method"] == "PUT" and req["path"] == "/bucket/img.png?X-Amz-Signature=abc"
    assert req["headers"]["Content-Type"] == "image/png"
    assert req["headers"]["Content-Length"] == str(len(data)) and req["body"] == data


def test_receiver_that_never_succeeds_is_given_up_after_retry_for(receiver, tmp_path, caplog):
    r = receiver(lambda h, n: answer(h, 503))

    async def main():
        box = Outbox(tmp_path / "outbox.db", allow_private=True, initial_delay=0.05, retry_for=1)
        await box.start()
        t0 = time.monotonic()
        box.enqueue_webhook(r.url + "/hook?token=secret", {"x": 1})
        assert await box.flush(5)
        elapsed = time.monotonic() - t0
        await box.close()
        return box.stats, elapsed
    with caplog.at_level("INFO", logger="k5serve.outbound"):
        stats, elapsed = run(main())
    assert 0.4 < elapsed < 2.0
    assert stats["webhook"]["delivered"] == 0 and stats["webhook"]["failed"] == 1
    assert stats["webhook"]["retried"] == len(r.requests) - 1 >= 3  # 0.05, 0.1, 0.2, 0.4 ... within 1 s
    assert "given up" in caplog.text and "secret" not in caplog.text


def test_webhook_redirect_is_not_followed(receiver, tmp_path):
    r = receiver(lambda h, n: answer(h, 302, headers={"Location": "/elsewhere"}))

    async def main():
        box = Outbox(tmp_path / "outbox.db", allow_private=True, initial_delay=0.05, retry_for=0.3)
        await box.start()
        box.enqueue_webhook(r.url + "/hook", {"x": 1})
        assert await box.flush(5)
        await box.close()
        return box.stats
    assert run(main())["webhook"]["failed"] == 1
    assert set(r.paths()) == {"/hook"}


def test_policy_refusal_fails_at_once(tmp_path, caplog):
    async def main():
        box = Outbox(tmp_path / "outbox.db", allow_private=False, initial_delay=0.05, retry_for=5)
        await box.start()
        box.enqueue_webhook("http://169.254.169.254/latest/meta-data?token=secret", {"x": 1})
        box.enqueue_upload("ftp://example.com/x", b"img", "image/png")
        assert await box.flush(2)
        await box.close()
        return box.stats
    with caplog.at_level("WARNING", logger="k5serve.outbound"):
        stats = run(main())
    assert stats["webhook"] == {"delivered": 0, "retried": 0, "failed": 1}
    assert stats["upload"] == {"delivered": 0, "retried": 0, "failed": 1}
    assert "refused by the URL policy" in caplog.text and "secret" not in caplog.text


def test_pending_entries_survive_close_and_reopen(receiver, tmp_path):
    ok = threading.Event()
    r = receiver(lambda h, n: answer(h, 200 if ok.is_set() else 503))
    db = tmp_path / "outbox.db"
    body = {"data": [{"taskUUID": "persist"}]}

    async def first():
        box = Outbox(db, allow_private=True, initial_delay=0.3, retry_for=60)
        box.enqueue_upload(r.url + "/never-started", b"abc", "image/jpeg")  # queued before start
        await box.close()
        box = Outbox(db, allow_private=True, initial_delay=0.3, retry_for=60)
        box.enqueue_webhook(r.url + "/hook", body)
        await box.start()
        # both tried once, failed and rescheduled (the receiver's log alone could beat the reschedule)
        await until(lambda: box.stats["webhook"]["retried"] + box.stats["upload"]["retried"] >= 2)
        await box.close()
        return box.stats

    async def second():
        box = Outbox(db, allow_private=True, initial_delay=0.3, retry_for=60)
        assert box.pending() == 2
        await box.start()
        assert await box.flush(5)
        await box.close()
        return box.stats
    assert run(first())["webhook"]["delivered"] == 0
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*), SUM(attempts) FROM outbox").fetchone() == (2, 2)
    ok.set()
    stats = run(second())
    assert stats["webhook"]["delivered"] == 1 and stats["upload"]["delivered"] == 1
    delivered = [q for q in r.requests[2:] if q["path"] == "/hook"]
    assert len(delivered) == 1 and json.loads(delivered[0]["body"]) == body


def test_enqueue_is_quick_and_a_slow_receiver_does_not_hold_up_others(receiver, tmp_path):
    slow = receiver(lambda h, n: (time.sleep(2), answer(h, 200)))
    fast = receiver()

    async def main():
        box = Outbox(tmp_path / "outbox.db", allow_private=True, timeout=5)
        await box.start()
        t0 = time.monotonic()
        for i in range(20):
            box.enqueue_webhook(slow.url + f"/hook/{i}", {"i": i})
        enqueue_s = time.monotonic() - t0
        await asyncio.sleep(0.1)
        box.enqueue_webhook(fast.url + "/hook", {"fast": True})
        t1 = time.monotonic()
        await until(lambda: box.stats["webhook"]["delivered"] == 1, timeout=1.5)
        fast_s = time.monotonic() - t1
        in_flight_at_slow = len(slow.requests)
        assert await box.flush(0.1) is False  # slow entries still pending: flush gives up at its timeout
        await box.close()  # cancels the slow deliveries; they stay queued
        return enqueue_s, fast_s, in_flight_at_slow
    enqueue_s, fast_s, in_flight_at_slow = run(main())
    assert enqueue_s < 0.5
    assert fast_s < 1.0 and len(fast.requests) == 1
    assert in_flight_at_slow == 4  # per-origin cap: the slow receiver holds 4 of the 8 slots


def test_enqueue_from_another_thread_wakes_the_loop(receiver, tmp_path):
    r = receiver()

    async def main():
        box = Outbox(tmp_path / "outbox.db", allow_private=True)
        await box.start()
        await asyncio.to_thread(box.enqueue_webhook, r.url + "/hook", {"from": "thread"})
        assert await box.flush(3)
        await box.close()
        return box.stats
    assert run(main())["webhook"]["delivered"] == 1
