"""A Ray Serve replica: one engine (T2I, shared-encoder I2I, LoRAs, step caching, safety) on one device, one
generation at a time, its progress streamed back to the front-end while it runs.

Imported only by `RayWorker` (the front-end) and by Ray inside each replica process; torch is imported in the
replica's constructor, never at module level.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from .config import EngineConfig, LoadConfig
from .worker import GenerationError, GenerationSpec, InvalidInput

log = logging.getLogger("k5serve.replica")


class K5Replica:
    """The deployment's class (`serve.deployment(K5Replica, ...)` in ray_worker.py)."""

    def __init__(self, load: LoadConfig, engine: EngineConfig, threads: int | None = None, registry: Any = None,
                 fault_prompt: str | None = None, crash_prompt: str | None = None):
        import ray
        import torch
        from ray import serve

        from .loader import load_engine

        self.name = serve.get_replica_context().replica_id.unique_id  # Ray Serve's replica id
        self._registry = registry  # ray_worker.ReplicaRegistry: where the front-end reads device and load errors
        self._report(state="loading")
        if threads:  # on the CPU each replica gets its share of the cores (Ray's num_cpus), and uses that many
            torch.set_num_threads(threads)
        try:
            self._engine, self._info = load_engine(load, engine)
        except Exception as exc:
            self._report(wait=True, state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        self._fault_prompt = fault_prompt
        self._crash_prompt = crash_prompt  # testing aid: a prompt with this text kills the replica mid-task
        device = self._info.get("device", "?")
        if device.startswith("cuda"):
            device += f" ({torch.cuda.get_device_name()}, Ray GPU {','.join(map(str, ray.get_gpu_ids()))})"
        plan = self._info.get("memory_plan") or {}
        self._report(state="loaded", device=device, threads=torch.get_num_threads(),
                     loadSeconds=self._info.get("load_seconds"), memoryProfile=plan.get("profile"),
                     memoryPeakBytes=plan.get("peak_bytes"))
        log.info("replica %s loaded %s on %s", self.name, load.path, device)

    def _report(self, *, wait: bool = False, **row: Any) -> None:
        if self._registry is None:
            return
        ref = self._registry.report.remote(self.name, row)
        if wait:  # the process is about to fail: let the report land first
            import ray

            ray.wait([ref], timeout=10)

    async def generate(self, spec: GenerationSpec) -> AsyncIterator[tuple]:
        """Yields ("progress", step, total) as steps finish, then one of ("output", GenerationOutput),
        ("invalid", message, code, parameter, replica) or ("failed", message, replica). Failures travel as
        values: an exception would have to survive pickling across processes."""
        from .local import run_job

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_step(done: int, total: int) -> None:  # from the generation thread
            loop.call_soon_threadsafe(events.put_nowait, ("progress", done, total))

        def run() -> tuple:
            if self._crash_prompt and self._crash_prompt in spec.prompt:
                on_step(1, spec.steps)
                os._exit(3)  # a replica process that dies mid-task (out of memory, a driver fault, a kill)
            try:
                output = run_job(self._engine, spec, on_step, self._fault_prompt)
            except InvalidInput as exc:
                return ("invalid", str(exc), exc.code, exc.parameter, self.name)
            except GenerationError as exc:
                return ("failed", str(exc), self.name)
            output.worker = self.name
            return ("output", output)

        job = asyncio.ensure_future(asyncio.to_thread(run))
        while not job.done():
            step = asyncio.ensure_future(events.get())
            await asyncio.wait({step, job}, return_when=asyncio.FIRST_COMPLETED)
            if step.done():
                yield step.result()
            else:
                step.cancel()
        while not events.empty():  # progress reported just before the job ended
            yield events.get_nowait()
        yield job.result()
