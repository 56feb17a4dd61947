"""`LocalWorker`: one engine (pipelines on one device) driven by one thread fed by a bounded queue, so the
event loop never blocks on the accelerator. The queue is fair between callers (`fair_queue.FairQueue`): each
job's caller (from its request context) and weight decide its turn; first in first out within a caller."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from k5serve.context import RequestContext, current_request
from k5serve.logcontext import current_task

from .engine import K5Engine
from .fair_queue import FairQueue
from .lora_files import list_lora_files
from .worker import GenerationError, GenerationOutput, GenerationSpec, InvalidInput, ProgressCallback, QueueFull, Worker

log = logging.getLogger("k5serve.worker")


@dataclass
class _Job:
    spec: GenerationSpec
    on_progress: ProgressCallback | None
    future: Future
    submitted: float
    context: RequestContext | None  # who asked: the job's log lines say so


class LocalWorker(Worker):
    """One engine (pipelines on one device), one thread, a bounded queue fair between callers."""

    def __init__(
        self,
        engine: K5Engine,
        *,
        max_queue: int = 64,
        info: dict[str, Any] | None = None,
        fault_prompt: str | None = None,
    ):
        self._engine = engine
        # Testing aid (hidden CLI flag): a prompt containing this text raises CUDA's out-of-memory error
        # inside the job, to exercise the real failure path on machines without a GPU.
        self._fault_prompt = fault_prompt
        self.features = engine.features
        self._queue = FairQueue(max_queue)
        self._info = info or {}
        self._busy = 0
        self._thread = threading.Thread(target=self._loop, name="k5serve-generation", daemon=True)
        self._thread.start()

    def submit(self, spec: GenerationSpec, on_progress: ProgressCallback | None = None, *,
               context: RequestContext | None = None) -> Future:
        self._engine.check(spec)  # raises InvalidInput before the job takes a queue slot
        future: Future = Future()
        try:
            self._queue.put_nowait(_Job(spec, on_progress, future, time.monotonic(), context), *_share(context))
        except queue.Full:
            raise QueueFull(f"generation queue is full ({self._queue.maxsize} tasks waiting)") from None
        return future

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + self._busy

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def max_queue(self) -> int:
        return self._queue.maxsize

    @property
    def queue_full(self) -> bool:
        return self._queue.full()

    def describe(self) -> dict[str, Any]:
        return {**self._info, **self._engine.describe()}

    def memory(self) -> dict[str, int]:
        return self._engine.memory()

    def loras(self) -> list[str]:
        lora_dir = self._engine.config.lora_dir
        return list_lora_files(lora_dir) if lora_dir else []

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._queue.close()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:  # closed, and nothing waits
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            self._busy = 1
            token, request = current_task.set(job.spec.task_id or None), current_request.set(job.context)
            waited = time.monotonic() - job.submitted
            try:
                output = run_job(self._engine, job.spec, job.on_progress, self._fault_prompt)
                output.queue_seconds = waited
                output.worker = "local"
            except (InvalidInput, GenerationError) as exc:
                exc.worker = "local"
                job.future.set_exception(exc)
            else:
                job.future.set_result(output)
            finally:
                self._busy = 0
                current_task.reset(token)
                current_request.reset(request)


def _share(context: RequestContext | None) -> tuple[str, float]:
    """Whose job it is and its weight: the caller's (a job no client sent shares the anonymous turn)."""
    return (context.caller.name, context.caller.weight) if context is not None else ("", 1.0)


def run_job(engine: K5Engine, spec: GenerationSpec, on_progress: ProgressCallback | None,
            fault_prompt: str | None = None) -> GenerationOutput:
    """One generation on `engine`, as every worker runs it: InvalidInput passes through; any other failure
    releases accelerator memory and becomes a GenerationError that says why (this job fails, nothing else)."""
    try:
        if fault_prompt and fault_prompt in spec.prompt:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (injected by --inject-oom-prompt)")
        return engine.generate(spec, on_step=on_progress)
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure fails this job only
        _release_accelerator_memory()
        if type(exc).__name__ == "OutOfMemoryError":
            log.error("out of accelerator memory for task %s; memory released", spec.task_id)
            raise GenerationError("the accelerator ran out of memory for this task; try fewer images or a smaller "
                                  "size, or start the server with --offload model") from None
        log.exception("generation failed for task %s", spec.task_id)
        raise GenerationError(f"{type(exc).__name__}: {exc}") from None


def _release_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort after a failure
        pass
