"""A bounded queue that serves tenants in proportion to their weights, first in first out within a tenant.

Start-time fair queuing (Goyal, Vin and Cheng, 1996), with every job counted as one unit of work: a job gets a
start tag, the later of the queue's virtual time and the finish tag of its tenant's previous job, and a finish
tag `start + 1/weight`; `get` serves the job with the lowest start tag (the earlier job on a tie), and the
virtual time becomes that tag. So a tenant that floods the queue cannot make a newcomer wait behind its backlog:
the newcomer's first job starts at the current virtual time, ahead of the flood's next one. A tenant alone gets
every slot (nothing idles while a job waits), and over a busy stretch tenants get slots in proportion to their
weights. Whenever a slot asks for work and nobody waits, the history is forgotten (the virtual time moves to the
latest finish tag): the next busy stretch starts even. No torch here; the local worker and the Ray Serve worker
both use it.

The standard library's `queue.Queue` is FIFO only and `PriorityQueue` needs the priorities up front, and no
well-kept library does weighted fair queuing of in-process jobs: hence this one, about 80 lines.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
from typing import Any


class FairQueue:
    def __init__(self, maxsize: int):
        self.maxsize = maxsize  # 0 or less: no bound (as `queue.Queue`)
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, Any]] = []  # (start tag, arrival, item)
        self._finish: dict[str, float] = {}  # each tenant's last finish tag, while it may still matter
        self._vtime = 0.0
        self._arrival = itertools.count()
        self._closed = False

    def put_nowait(self, item: Any, tenant: str = "", weight: float = 1.0) -> None:
        """Queue `item` for `tenant`; queue.Full when `maxsize` jobs wait already."""
        with self._lock:
            if self._closed or 0 < self.maxsize <= len(self._heap):
                raise queue.Full
            start = max(self._vtime, self._finish.get(tenant, 0.0))
            self._finish[tenant] = start + 1.0 / weight
            heapq.heappush(self._heap, (start, next(self._arrival), item))
            self._lock.notify()

    def get(self) -> Any:
        """The next job (blocking), or None once `close` was called and nothing waits any more."""
        with self._lock:
            while not self._heap:
                if self._closed:
                    return None
                # A slot is free and nobody waits: what anyone had is history, the next busy stretch starts even.
                self._vtime = max(self._vtime, *self._finish.values()) if self._finish else self._vtime
                self._finish.clear()
                self._lock.wait()
            start, _, item = heapq.heappop(self._heap)
            self._vtime = start
            # Tenants whose last job finished in the virtual past start anew at the virtual time anyway.
            if len(self._finish) > 4 * len(self._heap) + 64:
                self._finish = {t: f for t, f in self._finish.items() if f > start}
            return item

    def drain(self) -> list[Any]:
        """Take every waiting job out at once (they will not run), in the order they would have run."""
        with self._lock:
            items = [item for _, _, item in sorted(self._heap)]
            self._heap.clear()
            return items

    def close(self) -> None:
        """No more jobs will come: `get` returns what waits, then None."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def qsize(self) -> int:
        with self._lock:
            return len(self._heap)

    def full(self) -> bool:
        return 0 < self.maxsize <= self.qsize()
