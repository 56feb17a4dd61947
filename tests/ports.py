"""A free loopback port: the one helper the tests, their helper servers (PostgreSQL, S3) and the benchmarks
all use to start something on 127.0.0.1."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; whoever binds it next may still race for it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
