"""`RayWorker`: the `Worker` interface over Ray Serve replicas, one engine on one device each.

The front-end keeps the Runware protocol, validation, task records, images and delivery; this class hands
each job to a Ray Serve deployment (`replica.K5Replica`) through its deployment handle and streams the job's
progress back. Ray Serve routes each job to a free replica (`max_ongoing_requests=1`: one generation at a
time per replica); the jobs beyond the replicas wait in Ray Serve's queue, bounded here: at most
`replicas + max_queue` jobs are in flight, and one more is refused with `QueueFull` (a 429 to the client).

Torch-free: the front-end process imports ray, never torch. Ray itself is an optional extra
(`pip install 'k5serve[ray]'`), imported only when this module is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from .config import EngineConfig, LoadConfig, WorkerConfig, engine_features
from .lora_files import LoraError, resolve_lora_file
from .replica import K5Replica
from .worker import GenerationError, GenerationSpec, InvalidInput, ProgressCallback, QueueFull, Worker

log = logging.getLogger("k5serve.ray")

APP_NAME = "k5serve"


class RayWorker(Worker):
    def __init__(self, load: LoadConfig, engine: EngineConfig, workers: WorkerConfig, *, max_queue: int = 64,
                 info: dict[str, Any] | None = None, fault_prompt: str | None = None,
                 crash_prompt: str | None = None):
        started = time.perf_counter()
        self._owns_ray = not ray.is_initialized() and workers.ray_address is None
        self._ray_thread: _RayOwner | None = None
        if not ray.is_initialized():
            self._ray_thread = _RayOwner(workers.ray_address)
        self._engine_config = engine
        self.features = engine_features(engine)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        on_gpu = gpus > 0 and load.device != "cpu"
        if workers.autoscale is not None:
            low, high = workers.autoscale
            scaling: dict[str, Any] = {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                                              "target_ongoing_requests": 1}}
        else:
            high = workers.replicas or (gpus if on_gpu else 1)
            scaling = {"num_replicas": high}
        cpus = int(resources.get("CPU", os.cpu_count() or 1))
        # Each CPU replica gets its share of the cores (or the operator's count), as Ray CPUs and torch threads.
        threads = None if on_gpu else workers.replica_threads or max(1, cpus // high)
        actor = {"num_gpus": 1} if on_gpu else {"num_cpus": threads}
        deployment = serve.deployment(K5Replica, name="K5Replica", max_ongoing_requests=1,
                                      ray_actor_options=actor, **scaling)
        serve.start(proxy_location="Disabled")  # the front-end serves HTTP, not Ray's proxy
        handle = serve.run(deployment.bind(load, engine, threads, fault_prompt, crash_prompt), name=APP_NAME,
                           route_prefix=None)
        self._stream = handle.options(stream=True)
        self._describe = handle.describe
        self._replicas = high
        self._max_queue = max_queue
        self._capacity = high + max_queue
        self._inflight = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self._capacity, thread_name_prefix="k5serve-ray")
        self._closed = False
        self._tasks_done: Counter[str] = Counter()  # per replica (node/pid), from the outputs
        self._states: dict[str, int] = {}
        self._states_at = 0.0
        self._info = {**(info or {}), "workers": "ray", "replicas": high,
                      "autoscale": list(workers.autoscale) if workers.autoscale else None,
                      "ray_address": workers.ray_address, "threads_per_replica": threads,
                      "gpus_per_replica": 1 if on_gpu else 0,
                      "load_seconds": round(time.perf_counter() - started, 2)}
        log.info("%d Ray Serve replica(s) ready (%s per replica)", high,
                 "1 GPU" if on_gpu else f"{threads} CPU thread(s)")

    def submit(self, spec: GenerationSpec, on_progress: ProgressCallback | None = None) -> Future:
        self._check(spec)
        with self._lock:
            if self._inflight >= self._capacity:
                raise QueueFull(f"generation queue is full ({self._max_queue} tasks waiting for "
                                f"{self._replicas} replica(s))")
            self._inflight += 1
        future: Future = Future()
        self._pool.submit(self._run, spec, on_progress, future, time.monotonic())
        return future

    def _check(self, spec: GenerationSpec) -> None:
        """Before queueing: every requested LoRA file exists (LoRA folders are the same path on every node)."""
        for index, (model, _) in enumerate(spec.loras):
            try:
                resolve_lora_file(self._engine_config.lora_dir, model)
            except LoraError as exc:
                raise InvalidInput(str(exc), code="invalidLoraModel", parameter=f"lora[{index}].model") from None

    def _run(self, spec: GenerationSpec, on_progress: ProgressCallback | None, future: Future,
             submitted: float) -> None:
        try:
            if not future.set_running_or_notify_cancel():
                return
            result = None
            try:
                for event in self._stream.generate.remote(spec):
                    if event[0] == "progress":
                        if on_progress is not None:
                            on_progress(event[1], event[2])
                    else:
                        result = event
            except ray.exceptions.RayError as exc:
                log.error("the replica running task %s stopped: %s", spec.task_id, type(exc).__name__)
                future.set_exception(GenerationError(
                    f"the worker running this task stopped before it finished ({type(exc).__name__}: its process "
                    "died or was killed; Ray Serve starts a new one); run it again"))
                return
            if result is None:
                future.set_exception(GenerationError("the worker ended this task without a result"))
            elif result[0] == "output":
                output = result[1]
                with self._lock:
                    self._tasks_done[output.worker] += 1
                output.queue_seconds = max(0.0, time.monotonic() - submitted - output.seconds)
                future.set_result(output)
            elif result[0] == "invalid":
                future.set_exception(InvalidInput(result[1], code=result[2], parameter=result[3]))
            else:
                future.set_exception(GenerationError(result[1]))
        except Exception as exc:  # noqa: BLE001 - never leave a future unresolved
            log.exception("task %s failed in the Ray worker", spec.task_id)
            if not future.done():
                future.set_exception(GenerationError(f"{type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._inflight -= 1

    @property
    def queue_depth(self) -> int:
        return self._inflight

    @property
    def alive(self) -> bool:
        return not self._closed

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def queue_full(self) -> bool:
        return self._inflight >= self._capacity

    def unready(self) -> str | None:
        states = self.replica_states()
        if states and not states.get("RUNNING"):
            return f"no replica is running ({', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items()))})"
        return None

    def replica_states(self) -> dict[str, int]:
        """Replicas by Ray Serve state (RUNNING, STARTING, RECOVERING, ...), read from the controller at most
        once a second."""
        now = time.monotonic()
        if now - self._states_at >= 1.0:
            self._states_at = now
            try:
                app = serve.status().applications.get(APP_NAME)
                deployment = app.deployments.get("K5Replica") if app is not None else None
                if deployment is not None:
                    self._states = {str(getattr(s, "value", s)): n for s, n in deployment.replica_states.items()}
            except Exception:  # noqa: BLE001 - the last answer stands; the log says why
                log.warning("reading the replicas' states from Ray Serve failed", exc_info=True)
        return dict(self._states)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            done = dict(self._tasks_done)
        replicas = [{"id": name, "node": name.split("/")[0], "pid": int(name.split("/")[1]), "tasksDone": n}
                    for name, n in sorted(done.items()) if "/" in name]
        return {**self._info, "replicaStates": self.replica_states(), "replicasSeen": replicas}

    def close(self) -> None:
        """Remove the deployment and stop Ray if this process started it. The server has already waited for the
        tasks in flight (up to --shutdown-timeout) and recorded the rest as failed; jobs not started are dropped."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            serve.delete(APP_NAME)
            if self._owns_ray:
                serve.shutdown()
                ray.shutdown()
        except Exception:  # noqa: BLE001 - shutting down: log and go on
            log.exception("stopping Ray Serve failed")
        if self._ray_thread is not None:
            self._ray_thread.release()


class _RayOwner(threading.Thread):
    """Connects this process to Ray (starting a local instance when no address is given) from a thread that
    lives as long as the worker. Why not from the caller's thread: Ray's local processes (GCS, raylet) die with
    the thread that started them (Linux's parent-death signal follows the thread), and the caller is the
    short-lived thread that loads the model."""

    def __init__(self, address: str | None):
        super().__init__(name="k5serve-ray", daemon=True)
        self._address = address
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def run(self) -> None:
        try:
            # log_to_driver=False: replica logs stay in Ray's session logs; the server's stdout stays JSON lines.
            ray.init(address=self._address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._error = exc
        self._ready.set()
        self._done.wait()

    def release(self) -> None:
        self._done.set()
