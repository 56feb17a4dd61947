"""The model's lifecycle in one place: loading it in the background, then holding the worker or the
reason it could not load, and saying whether it can take work.

`create_app` gets a `ModelSlot` and starts it at start-up; the dispatcher and `/health`, `/ready` and
`/metrics` read it. The loader callable returns any `Worker` (the in-process `LocalWorker`, replicas on
another machine): nothing here imports torch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from k5serve.pipelines.worker import Worker

log = logging.getLogger("k5serve.app")

LOADING, LOADED, FAILED = "loading", "loaded", "error"


class ModelSlot:
    def __init__(self, load: Callable[[], Worker], known: dict[str, Any] | None = None):
        """`known`: what is known of the model before it loads (e.g. `tiny_weights`), for /ready and /health
        from the start."""
        self._load = load
        self.known = dict(known or {})
        self._worker: Worker | None = None
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why loading failed
        self.loading_note: str | None = None  # what the loader last said while loading (see `note`)

    def start(self) -> None:
        """Load in a background thread (the real weights take minutes; /health answers meanwhile)."""
        if self._worker is None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="k5serve-load", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._worker = self._load()
        except Exception as exc:  # noqa: BLE001 - reported by /health and the log
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")

    def note(self, text: str) -> None:
        """For the loader: what it is waiting for (e.g. replicas waiting for a GPU), shown by /ready."""
        self.loading_note = text

    @property
    def worker(self) -> Worker | None:
        """The loaded worker; None while loading or after a failed load."""
        return self._worker

    @property
    def state(self) -> str:
        return FAILED if self.error else LOADED if self._worker is not None else LOADING

    @property
    def features(self) -> frozenset[str]:
        """The optional request features the loaded worker serves (none before it has loaded)."""
        return self._worker.features if self._worker is not None else frozenset()

    def readiness(self) -> tuple[list[str], dict[str, Any]]:
        """-> (reasons the model cannot take work now, the worker's state for /ready and /health)."""
        worker = self._worker
        if self.error:
            return [f"model loading failed: {self.error}"], dict(self.known)
        if worker is None:
            note = self.loading_note
            return ["the model is still loading" + (f" ({note})" if note else "")], dict(self.known)
        reasons = []
        if not worker.alive:
            reasons.append("the generation worker has stopped")
        unready = worker.unready()
        if unready:
            reasons.append(unready)
        if worker.queue_full:
            reasons.append(f"the queue is full ({worker.max_queue} waiting besides the running task)")
        body: dict[str, Any] = {**self.known, "workerAlive": worker.alive, "queue": worker.queue_depth,
                                "queueLimit": worker.max_queue, **worker.describe()}
        memory = worker.memory()
        if memory:
            body["gpuMemoryBytes"] = memory
        return reasons, body

    def close(self) -> None:
        """Let the worker finish what it has queued, then stop it."""
        if self._worker is not None:
            self._worker.close()
