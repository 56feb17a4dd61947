"""`RayWorker`: the `Worker` interface over Ray Serve replicas, one engine on one device each.

The front-end keeps the Runware protocol, validation, task records, images and delivery; this class hands
each job to a Ray Serve deployment (`replica.K5Replica`) through its deployment handle and streams the job's
progress back. Ray Serve routes each job to a free replica (`max_ongoing_requests=1`: one generation at a
time per replica). The jobs beyond the replicas wait here, not in Ray Serve's queue: in a queue fair between
callers (`fair_queue.FairQueue`), from which one thread per replica takes the next job whenever its last one
ended, so each free replica goes to the callers in proportion to their weights. At most `replicas + max_queue`
jobs are in flight; one more is refused with `QueueFull` (a 429 to the client). With autoscaling there is a
thread per replica Ray Serve may scale up to: while fewer run, the jobs taken beyond them wait in Ray Serve's
own queue, first in first out.

Torch-free: the front-end process imports ray, never torch. Ray itself is an optional extra
(`pip install 'k5serve[ray]'`), imported only when this module is.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from k5serve.context import RequestContext, current_request
from k5serve.logcontext import current_task

from .config import EngineConfig, LoadConfig, WorkerConfig, engine_features
from .fair_queue import FairQueue
from .lora_files import check_lora_files, list_lora_files
from .replica import K5Replica
from .worker import GenerationError, GenerationSpec, InvalidInput, ProgressCallback, QueueFull, Worker

log = logging.getLogger("k5serve.ray")

DEPLOYMENT = "K5Replica"


class RayWorker(Worker):
    def __init__(self, load: LoadConfig, engine: EngineConfig, workers: WorkerConfig, *, max_queue: int = 64,
                 info: dict[str, Any] | None = None, fault_prompt: str | None = None,
                 crash_prompt: str | None = None, on_status: Callable[[str], None] | None = None):
        """Deploys the replicas and waits until they all run. `on_status(text)` hears what Ray Serve says of
        the deployment while it waits (e.g. that a replica cannot be scheduled on the cluster's resources)."""
        started = time.perf_counter()
        self._owns_ray = not ray.is_initialized() and workers.ray_address is None
        self._ray_thread: _RayOwner | None = None
        if not ray.is_initialized():
            self._ray_thread = _RayOwner(workers.ray_address)
        self._app = workers.ray_app  # several front-ends on one cluster: one application (and replicas) each
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
        # Each CPU replica gets its share of the cores (or the operator's count), as Ray CPUs and torch threads;
        # never more than the largest node has, or no node could ever take it.
        largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus)
        threads = None if on_gpu else workers.replica_threads or max(1, min(cpus // high, largest))
        actor = {"num_gpus": 1} if on_gpu else {"num_cpus": threads}
        deployment = serve.deployment(K5Replica, name=DEPLOYMENT, max_ongoing_requests=1,
                                      ray_actor_options=actor, **scaling)
        # Lives as long as this process (not detached): replicas report their device and load errors to it.
        self._registry = ReplicaRegistry.options(num_cpus=0).remote()
        serve.start(proxy_location="Disabled")  # the front-end serves HTTP, not Ray's proxy
        watching = _DeploymentWatch(on_status, self._app) if on_status is not None else None
        try:
            handle = serve.run(deployment.bind(load, engine, threads, self._registry, fault_prompt, crash_prompt),
                               name=self._app, route_prefix=None)
        except Exception as exc:
            reason = self._load_failure() or f"{type(exc).__name__}: {exc}"
            self._shutdown()
            raise RuntimeError(f"the Ray Serve replicas failed to load: {reason}") from None
        finally:
            if watching is not None:
                watching.stop()
        self._stream = handle.options(stream=True)
        self._replicas = high
        self._max_queue = max_queue
        self._capacity = high + max_queue  # jobs waiting or running: the bound, as before the fair queue
        self._queue = FairQueue(self._capacity)  # the jobs waiting for a replica (never the tighter bound)
        self._inflight = 0  # waiting or running
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=high, thread_name_prefix="k5serve-ray")
        for _ in range(high):  # one job in flight per replica (with autoscaling, per replica it may have)
            self._pool.submit(self._serve_forever)
        self._closed = False
        self._tasks_done: Counter[str] = Counter()  # per replica id, from the outputs
        self._view: dict[str, Any] = {}  # the replicas as Ray Serve and the registry last described them
        self._view_at = 0.0
        self._info = {**(info or {}), "workers": "ray", "replicaTarget": high,
                      "autoscale": list(workers.autoscale) if workers.autoscale else None,
                      "ray_address": workers.ray_address, "threads_per_replica": threads,
                      "gpus_per_replica": 1 if on_gpu else 0,
                      "load_seconds": round(time.perf_counter() - started, 2)}
        log.info("%d Ray Serve replica(s) ready (%s per replica)", high,
                 "1 GPU" if on_gpu else f"{threads} CPU thread(s)")

    def submit(self, spec: GenerationSpec, on_progress: ProgressCallback | None = None, *,
               context: RequestContext | None = None) -> Future:
        check_lora_files(self._engine_config.lora_dir, spec.loras)
        future: Future = Future()
        share = (context.caller.name, context.caller.weight) if context is not None else ("", 1.0)
        with self._lock:
            try:
                if self._inflight >= self._capacity:
                    raise queue.Full
                self._queue.put_nowait((spec, on_progress, future, time.monotonic(), context), *share)
            except queue.Full:  # (also once closed)
                raise QueueFull(f"generation queue is full ({self._max_queue} tasks waiting for "
                                f"{self._replicas} replica(s))") from None
            self._inflight += 1
        return future

    def _serve_forever(self) -> None:
        """One replica's turn: the next job of the fair queue, run to its end, again, until closed."""
        while (job := self._queue.get()) is not None:
            self._run(*job)

    def _run(self, spec: GenerationSpec, on_progress: ProgressCallback | None, future: Future,
             submitted: float, context: RequestContext | None) -> None:
        tokens = current_task.set(spec.task_id or None), current_request.set(context)  # for this thread's lines
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
                replica = _replica_named_in(exc, self._app)
                log.error("the replica running task %s stopped: %s, worker %s", spec.task_id, type(exc).__name__,
                          replica or "?")
                future.set_exception(GenerationError(
                    f"the worker running this task stopped before it finished ({type(exc).__name__}: its process "
                    "died or was killed; Ray Serve starts a new one); run it again", worker=replica))
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
                future.set_exception(InvalidInput(result[1], code=result[2], parameter=result[3], worker=result[4]))
            else:
                future.set_exception(GenerationError(result[1], worker=result[2]))
        except Exception as exc:  # noqa: BLE001 - never leave a future unresolved
            log.exception("task %s failed in the Ray worker", spec.task_id)
            if not future.done():
                future.set_exception(GenerationError(f"{type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._inflight -= 1
            current_task.reset(tokens[0])
            current_request.reset(tokens[1])

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
        view = self._replica_view()
        states = view.get("replicaStates")
        if states is not None and not states.get("RUNNING"):
            counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none left"
            why = view.get("loadFailures") and view["loadFailures"][-1]["error"] or view.get("deploymentMessage")
            return f"no replica is running ({counts})" + (f"; last failure: {why}" if why else "")
        return None

    def _replica_view(self) -> dict[str, Any]:
        """One row per live replica (Ray Serve's id, node, process, state; the device it reported; the tasks it
        finished here), the recent load failures, and the deployment's status: read at most once a second.

        The rows come from the Serve controller's instance details, the data behind Ray's dashboard and
        `serve status` (`ServeInstanceDetails`, a stable schema); Ray's public `serve.status()` has only counts.
        """
        now = time.monotonic()
        if now - self._view_at < 1.0:
            return self._view
        self._view_at = now
        try:
            from ray.serve.context import _get_global_client

            details = _get_global_client().get_serve_details()
            deployment = details["applications"][self._app]["deployments"][DEPLOYMENT]
            reports = ray.get(self._registry.rows.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - the last view stands; the log says why
            log.warning("reading the replicas from Ray Serve failed", exc_info=True)
            return self._view
        with self._lock:
            done = dict(self._tasks_done)
        rows, states = [], Counter()
        for replica in deployment["replicas"]:
            state = str(getattr(replica["state"], "value", replica["state"]))
            states[state] += 1
            report = reports.get(replica["replica_id"], {})
            rows.append({"id": replica["replica_id"], "state": state, "node": replica.get("node_ip"),
                         "nodeId": replica.get("node_id"), "pid": replica.get("pid"),
                         "device": report.get("device"), "threads": report.get("threads"),
                         "memoryProfile": report.get("memoryProfile"),
                         "memoryPeakBytes": report.get("memoryPeakBytes"),  # its plan's, on its own device
                         "tasksDone": done.get(replica["replica_id"], 0)})
        live = {row["id"] for row in rows}
        failures = [{"id": name, "error": error} for name, error in _load_errors(reports) if name not in live][-5:]
        status = str(getattr(deployment["status"], "value", deployment["status"]))
        self._view = {"replicaStates": dict(states), "replicas": rows, "loadFailures": failures,
                      "deploymentStatus": status, "deploymentMessage": deployment.get("message") or None}
        return self._view

    def _load_failure(self) -> str | None:
        """The error the last replica that failed to load reported, if one did."""
        try:
            reports = ray.get(self._registry.rows.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - no report: the caller has Ray Serve's own error
            return None
        failed = _load_errors(reports)
        return failed[-1][1] if failed else None

    def loras(self) -> list[str]:
        lora_dir = self._engine_config.lora_dir  # the front-end's copy of the folder the replicas read
        return list_lora_files(lora_dir) if lora_dir else []

    def describe(self) -> dict[str, Any]:
        view = {k: v for k, v in self._replica_view().items() if v or k == "replicas"}
        return {**self._info, **view}

    def close(self) -> None:
        """Remove the deployment and stop Ray if this process started it. The server has already waited for the
        tasks in flight (up to --shutdown-timeout) and recorded the rest as failed; jobs not started are dropped."""
        if self._closed:
            return
        self._closed = True
        self._queue.close()
        for _, _, future, _, _ in self._queue.drain():  # never started: failed, not left hanging
            with self._lock:
                self._inflight -= 1
            if future.set_running_or_notify_cancel():
                future.set_exception(GenerationError("the server stopped before this task started"))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            serve.delete(self._app)
            if self._owns_ray:
                serve.shutdown()
                ray.shutdown()
        except Exception:  # noqa: BLE001 - shutting down: log and go on
            log.exception("stopping Ray Serve failed")
        if self._ray_thread is not None:
            self._ray_thread.release()


@ray.remote
class ReplicaRegistry:
    """What each replica says of itself that Ray Serve does not keep: its device and thread count once loaded,
    or the error it failed to load with. Keyed by Ray Serve's replica id; the newest few hundred kept."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Any]] = {}

    def report(self, replica: str, row: dict[str, Any]) -> None:
        self._rows.setdefault(replica, {}).update(row, at=time.time())
        self._rows[replica] = self._rows.pop(replica)  # newest last
        while len(self._rows) > 256:
            del self._rows[next(iter(self._rows))]

    def rows(self) -> dict[str, dict[str, Any]]:
        return self._rows


def _load_errors(reports: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(replica id, error) of each replica that reported it failed to load, oldest first."""
    return [(name, report["error"]) for name, report in reports.items() if report.get("state") == "failed"]


def _replica_named_in(exc: BaseException, app: str) -> str:
    """The replica id in a Ray error about a replica actor (its actor name is SERVE_REPLICA::app#deployment#id)."""
    found = re.search(rf"{re.escape(app)}#{DEPLOYMENT}#(\w+)", str(exc))
    return found.group(1) if found else ""


class _DeploymentWatch(threading.Thread):
    """While `serve.run` waits for the replicas: hands Ray Serve's message about the deployment (replicas
    waiting for resources, constructors failing and retried) to `on_status`, and logs it, whenever it changes."""

    def __init__(self, on_status: Callable[[str], None], app: str):
        super().__init__(name="k5serve-ray-watch", daemon=True)
        self._on_status = on_status
        self._app = app
        self._stop = threading.Event()
        self.start()

    def run(self) -> None:
        said = ""
        while not self._stop.wait(2.0):
            try:
                app = serve.status().applications.get(self._app)
                deployment = app.deployments.get(DEPLOYMENT) if app is not None else None
                message = deployment.message if deployment is not None else ""
            except Exception:  # noqa: BLE001 - Serve is still starting; ask again
                continue
            if message and message != said:
                said = message
                log.warning("Ray Serve: %s", message)
                self._on_status(message)

    def stop(self) -> None:
        self._stop.set()


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
