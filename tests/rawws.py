"""A WebSocket client on a raw socket that reads only when asked: for clients that stop reading (the tests'
and benchmarks' greedy and stuck clients). The receive buffer is small (4 KiB), so the server meets the
back-pressure at once instead of after the kernel's megabytes; the frames are made by the `websockets`
library's sans-I/O client. No test code in it: benchmarks import it too."""

from __future__ import annotations

import json
import socket

from websockets.client import ClientProtocol
from websockets.uri import parse_uri


class RawClient:
    def __init__(self, url: str, receive_buffer: int = 4096):
        uri = parse_uri(url.replace("http", "ws", 1) + "/v1")
        self.protocol = ClientProtocol(uri, max_size=None)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect((uri.host, uri.port))
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.protocol.state.name == "CONNECTING":  # the handshake's answer, and nothing after it
            self.protocol.receive_data(self.sock.recv(4096))
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    def send(self, tasks: list[dict]) -> None:
        self.protocol.send_text(json.dumps(tasks).encode())
        self._flush()

    def read_frame(self) -> dict:
        """The next data frame the server sent (the only reading this client does)."""
        while True:
            frames = [e for e in self.protocol.events_received() if getattr(e, "data", None)]
            if frames:
                return json.loads(frames[0].data)
            self.protocol.receive_data(self.sock.recv(4096))

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            self.sock.sendall(data)
