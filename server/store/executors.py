"""Blocking store calls off the event loop, on thread pools of their own.

Task records, the outbox and WebSocket sessions (`database`) and the image store (`images`) each get a
bounded pool, so that a store that hangs (a database outage, a stuck bucket) holds only its own threads:
asyncio's default executor, which health checks and everything else share, stays free, and so does the
other store. A call that waits for a free thread waits in line; the stores themselves bound each call
(the database pool's time-out, S3's retries), so the line moves.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

SIZES = {"database": 16, "images": 16}
_pools: dict[str, ThreadPoolExecutor] = {}


def _pool(kind: str) -> ThreadPoolExecutor:
    pool = _pools.get(kind)
    if pool is None:
        pool = _pools[kind] = ThreadPoolExecutor(SIZES[kind], thread_name_prefix=f"k5serve-{kind}")
    return pool


async def database(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the database pool (task records, outbox, sessions), awaited."""
    return await asyncio.get_running_loop().run_in_executor(_pool("database"), functools.partial(fn, *args, **kwargs))


async def images(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the image store's pool (reads, writes, encoding for a write), awaited."""
    return await asyncio.get_running_loop().run_in_executor(_pool("images"), functools.partial(fn, *args, **kwargs))


def shutdown() -> None:
    """Let the pools' threads end (after the calls in flight); a later call starts new pools."""
    for pool in _pools.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _pools.clear()
