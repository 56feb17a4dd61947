"""Slow clients against the real server (`server/transport/listen.py`): a connection that does not send a complete
request head within --header-timeout is closed, also between keep-alive requests; --max-connections bounds
the connections open at once, and one more is answered 503 and closed; complete requests and WebSockets
are unaffected."""

from __future__ import annotations

import http.client
import os
import selectors
import socket
import subprocess
import sys
import time

import httpx
import pytest
from test_cli import k5serve
from test_ws import Client

HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 50
MARGIN = 8.0  # seconds past the timeout a loaded 2-core machine may take to close
PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("--header-timeout", str(HEADER_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS))


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def wait_closed(socks: list[socket.socket], timeout: float) -> list[tuple[float, bytes]]:
    """For each socket: seconds until the server closed it, and what it sent first. Fails past `timeout`."""
    start = time.monotonic()
    results: dict[socket.socket, tuple[float, bytes]] = {}
    received = {s: b"" for s in socks}
    with selectors.DefaultSelector() as selector:
        for s in socks:
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
        while len(results) < len(socks):
            left = start + timeout - time.monotonic()
            assert left > 0, f"{len(socks) - len(results)} of {len(socks)} connections still open after {timeout} s"
            for key, _ in selector.select(left):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                received[key.fileobj] += data
                if not data:
                    results[key.fileobj] = (time.monotonic() - start, received[key.fileobj])
                    selector.unregister(key.fileobj)
    for s in socks:
        s.close()
    return [results[s] for s in socks]


def test_heads_that_never_complete_are_closed(srv):
    socks = [connect(srv) for _ in range(40)]
    for s in socks[:20]:
        s.sendall(PARTIAL_HEAD)  # the other 20 send nothing at all
    closed = wait_closed(socks, HEADER_TIMEOUT + MARGIN)
    assert all(sent == b"" for _, sent in closed), "the server answered a request that never ended"
    assert min(seconds for seconds, _ in closed) > HEADER_TIMEOUT - 0.5, "closed before the timeout"


def test_bytes_of_an_unfinished_head_buy_no_time(srv):
    s = connect(srv)
    started = time.monotonic()
    with pytest.raises(OSError):  # reset or broken pipe once the server has closed it
        for byte in PARTIAL_HEAD + b"X-Slow: " + b"x" * 4000:  # a byte every 50 ms: 200 s if never closed
            s.sendall(bytes([byte]))
            time.sleep(0.05)
    assert HEADER_TIMEOUT - 0.5 < time.monotonic() - started < HEADER_TIMEOUT + MARGIN
    s.close()


def test_one_byte_of_the_next_head_on_a_keep_alive_connection(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/health")
    answer = conn.getresponse()
    assert answer.status == 200 and answer.read()
    conn.sock.sendall(b"G")  # cancels uvicorn's own keep-alive timer, which is not set again
    [(seconds, sent)] = wait_closed([conn.sock], HEADER_TIMEOUT + MARGIN)
    assert sent == b"" and seconds > HEADER_TIMEOUT - 0.5


def test_slow_but_complete_requests_are_answered(srv):
    s = connect(srv)
    for _ in range(2):  # two requests on one keep-alive connection, each head in two parts
        s.sendall(PARTIAL_HEAD)
        time.sleep(HEADER_TIMEOUT / 4)
        s.sendall(b"\r\n")
        answer = http.client.HTTPResponse(s)
        answer.begin()
        assert answer.status == 200 and answer.read()
    s.close()


def test_a_websocket_outlives_the_header_timeout(srv):
    client = Client(srv)
    time.sleep(HEADER_TIMEOUT + 1)  # idle on purpose: only heads have a deadline
    client.send({"taskType": "ping"})
    assert client.recv(10) == {"data": [{"taskType": "ping", "pong": True}]}
    client.close()


def test_connections_over_the_limit_are_answered_503_and_closed(srv):
    extra = 10
    socks = [connect(srv) for _ in range(MAX_CONNECTIONS + extra)]
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 503  # one more, while all are open
    closed = wait_closed(socks, HEADER_TIMEOUT + MARGIN)
    refused = [sent for _, sent in closed if sent]
    assert len(refused) == extra and all(sent.startswith(b"HTTP/1.1 503 ") for sent in refused)
    assert all(seconds > HEADER_TIMEOUT - 0.5 for seconds, sent in closed if not sent)  # held until the timeout
    deadline = time.monotonic() + 10
    while httpx.get(srv.url + "/health", timeout=10).status_code != 200:  # the server notes the closes at once
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_options_in_help_and_invalid_values_refused(tmp_path):
    help_text = " ".join(k5serve("serve", "--help").stdout.split())
    for option in ("--header-timeout", "K5SERVE_HEADER_TIMEOUT", "--max-connections", "K5SERVE_MAX_CONNECTIONS"):
        assert option in help_text
    for flag, value, message in (("--header-timeout", "0", "must be more than 0"),
                                 ("--header-timeout", "soon", "invalid"),
                                 ("--max-connections", "0", "must be at least 1")):
        res = k5serve("serve", "--tiny", "--data-dir", str(tmp_path), flag, value)
        assert res.returncode == 2 and flag in res.stderr and message in res.stderr, res.stderr
    res = k5serve("serve", "--tiny", "--data-dir", str(tmp_path),
                  env=dict(os.environ, K5SERVE_MAX_CONNECTIONS="-5"))
    assert res.returncode == 2 and "K5SERVE_MAX_CONNECTIONS" in res.stderr and "at least 1" in res.stderr


RAISE_LIMIT = """
import logging, resource, sys
from k5serve.server.transport.listen import raise_open_file_limit
logging.basicConfig(level=logging.WARNING)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 512))
raise_open_file_limit(int(sys.argv[1]))
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize(("max_connections", "soft", "warned"), [(100, 356, False), (1000, 512, True)])
def test_the_open_file_limit_is_raised_to_fit(max_connections, soft, warned):
    res = subprocess.run([sys.executable, "-c", RAISE_LIMIT, str(max_connections)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) == soft and ("open-file limit (512) is below" in res.stderr) is warned
