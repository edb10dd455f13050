"""Engines as Ray actors: one warm engine per GPU group, placed and watched by Ray.

    pool = RayPool("auto", workers=2, gpus_per_worker=1)
    pool.start(["ti2v-5b"])                                  # connect; check the cluster can hold every group
    service = Service(settings, config, token, pool)         # one worker thread per actor
    # or, on its own:
    (executor,) = RayPool("auto", workers=1).started(["ti2v-5b"]).executors("ti2v-5b")
    executor.load("ti2v-5b"); executor.generate(request)

``RayExecutor`` is the ``Executor`` of one actor (``EngineActor``), which holds a
``LocalExecutor``; loading, warming up, generating, progress, cancel and health are its
named methods. Ray places an actor on ``num_gpus = group size`` (a placement group of one
bundle, PACK, for groups of two GPUs; the engine is then split over them with
``artifex.multidevice.split``), or on one CPU when the cluster has no GPUs. Any Ray error
that means the actor is gone becomes ``ExecutorLost``: a server's job store counts a failed
attempt and queues the job again, another actor takes it, and that worker replaces its actor.

Files: an actor on the caller's node reads the inputs (image, S2V's audio and pose video) and
writes the mp4 and its sidecar straight where the request says; an actor on another node gets
the inputs' bytes, writes into a temporary directory of its own and returns the files' bytes,
which the caller writes (atomically). Progress: the actor keeps each running request's events and the caller polls
them while it waits, handing each to ``on_event``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from artifex.config import OptimizationConfig
from artifex.engine.executor import (
    Executor,
    ExecutorLost,
    ExecutorPool,
    LocalExecutor,
    RemoteError,
    describe_error,
    discard_outputs,
    process_report,
)
from artifex.engine.outputs import write_atomic
from artifex.errors import ArtifexError, GenerationCancelled, InvalidRequestError
from artifex.ray.cluster import dashboard_url, import_ray, use_cluster_token

log = logging.getLogger("artifex.serve")

POLL_S = 0.2  # how often the caller asks a busy actor for progress
REPORT_EVERY_S = 5.0  # and for its memory and load
PLACE_TIMEOUT_S = 300.0  # an actor (or its GPU group) not placed in this time counts as lost
MAX_GROUP = 2  # GPUs one engine can use: 1, or 2 through the two-device split
SHIPPED_INPUTS = ("image", "audio", "pose_video")  # request fields naming files the engine reads


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors that mean the actor (its process, its node) is gone."""
    import ray.exceptions as E

    names = ("RayActorError", "WorkerCrashedError", "ObjectLostError", "NodeDiedError", "OutOfMemoryError",
             "LocalRayletDiedError", "ActorUnschedulableError")
    return tuple(getattr(E, n) for n in names if hasattr(E, n))


def _lost(e: BaseException) -> ExecutorLost:
    """A Ray error of ``_lost_errors`` as ``ExecutorLost``, named with its first line."""
    return ExecutorLost(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


# -- inside the actor ---------------------------------------------------------------------------
class EngineActor:
    """One warm engine (a ``LocalExecutor``) in a Ray actor process (threaded: progress, cancel and health answer
    mid-request)."""

    def __init__(self, gpus: int):
        self.gpus = gpus
        self.local = LocalExecutor()
        self._lock = threading.Lock()
        self._events: dict[str, list] = {}
        self._cancel: set[str] = set()

    def identity(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"kind": "ray", "node": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(),
                "actor_id": ctx.get_actor_id(), "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def load(self, model: str, checkpoint: str | None, config: OptimizationConfig | None,
             single_files: dict | None) -> dict:
        """Load the engine (and split it over two GPUs for a group of two): {"load_s", "imports_s"} or
        {"error"}."""
        t0 = time.perf_counter()
        try:
            self.local.load(model, checkpoint, config, single_files)
            if self.gpus == 2:
                from artifex.multidevice.split import split_across_devices

                split_across_devices(self.local.engine, ("cuda:0", "cuda:1"))
        except ArtifexError as e:
            return {"error": str(e)}
        return {"load_s": time.perf_counter() - t0, "imports_s": self.local.imports_s}

    def warm_up(self, shapes) -> float:
        return self.local.warm_up(shapes)

    def generate(self, call_id: str, request, output_dir: str | None, inputs: dict[str, tuple[str, bytes]] | None,
                 ship: bool) -> dict:
        """Run one request: {"result"} or {"cancelled"} or {"error": describe_error}, with "events" and, when
        ``ship``, "files" (the written files' bytes, from a temporary directory instead of ``request.output``).
        ``inputs``: request field (image, audio, pose_video) -> (name, bytes) when the caller's files are on
        another node."""
        events: list = []
        with self._lock:
            self._events[call_id] = events
        work = Path(tempfile.mkdtemp(prefix="artifex-job-")) if (inputs or ship) else None
        for i, (field, (name, data)) in enumerate((inputs or {}).items()):
            path = work / f"{i}-{Path(name).name}"  # a name of its own per input, in this request's directory
            path.write_bytes(data)
            request = dataclasses.replace(request, **{field: str(path)})
        if ship:
            name = Path(request.output).name if request.output else None
            request = dataclasses.replace(request, output=str(work / name) if name else None)
            output_dir = str(work)

        def on_event(e) -> None:
            if e.stage != "done" and call_id in self._cancel:
                raise GenerationCancelled(f"request {call_id} cancelled at {e.stage}")
            events.append(e)

        try:
            try:
                result = self.local.generate(request, on_event=on_event, output_dir=output_dir)
            except GenerationCancelled:
                return {"cancelled": True, "events": list(events)}
            except Exception as e:  # the request fails; the actor lives on
                if not isinstance(e, ArtifexError):
                    log.exception("request failed")
                return {"error": describe_error(e), "events": list(events)}
            out = {"result": result, "events": list(events)}
            if ship:
                out["files"] = {key: Path(p).read_bytes() for key, p in
                                (("video", result.video_path), ("sidecar", result.sidecar_path)) if p is not None}
            return out
        finally:
            with self._lock:
                self._events.pop(call_id, None)
                self._cancel.discard(call_id)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)

    def progress(self, call_id: str, since: int) -> list:
        with self._lock:
            return list(self._events.get(call_id, [])[since:])

    def cancel(self, call_id: str) -> None:
        with self._lock:
            if call_id in self._events:
                self._cancel.add(call_id)

    def health(self) -> dict:
        devices = []
        if self.gpus:
            import torch

            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        return process_report(devices)


# -- on the caller's side ------------------------------------------------------------------------
def check_address(address: str) -> None:
    """Refuse what cannot be a cluster address, and an address nothing answers at, before Ray retries it."""
    if address.startswith("ray://"):
        raise InvalidRequestError("ray", f"{address}: Ray Client addresses are not supported; run artifex serve "
                                         "on a node of the cluster and give the head's HOST:PORT",
                                  ["auto", "HOST:PORT"])
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidRequestError("ray", f"{address!r} is not a cluster address", ["auto", "HOST:PORT"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as e:
        raise InvalidRequestError("ray", f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one "
                                         "with 'artifex cluster start --head' or give the head's HOST:PORT") from None


class RayPool(ExecutorPool):
    """Engines in Ray actors: ``workers`` per served model, each on ``gpus_per_worker`` GPUs (0: one CPU)."""

    kind = "ray"

    def __init__(self, address: str = "auto", workers: int | None = None, gpus_per_worker: int | None = None,
                 ship_outputs: bool | None = None):
        """``ship_outputs``: True sends files through Ray even on the caller's node (None: only from other nodes)."""
        self.address, self.workers, self.gpus_per_worker = address, workers, gpus_per_worker
        self.ship_outputs = ship_outputs
        self.dashboard: str | None = None
        self.gcs_address: str | None = None
        self.node_id: str | None = None
        self.nodes = 0
        self._started_ray = False
        self._groups: list = []  # placement groups, removed at shutdown

    # -- start-up --------------------------------------------------------------------------
    def start(self, models: list[str]) -> None:
        """Connect (``auto``: a running cluster, else a local one; ``HOST:PORT``: that cluster) and check
        that ``workers`` groups per model fit; fills in the defaults from the cluster's resources."""
        if self.address != "auto":
            check_address(self.address)
            note = use_cluster_token()  # Ray turns token mode on by itself only for a cluster it finds
            if note:
                log.info("ray: %s", note)
        ray = import_ray()
        quiet = {"logging_level": logging.WARNING, "configure_logging": False}
        if not ray.is_initialized():  # else this process joined a cluster already (a test, a notebook)
            try:
                ctx = ray.init(address=self.address, **quiet)
            except ConnectionError as e:
                if self.address != "auto":
                    raise InvalidRequestError("ray", f"cannot join the Ray cluster at {self.address}: {e} (a "
                                                     "cluster with token authentication needs its token here: "
                                                     "~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
                log.info("ray: no running cluster found; starting a local one")  # with its dashboard
                ctx = ray.init(**quiet)
            self._started_ray = True
            self.dashboard = dashboard_url(ctx.dashboard_url)
        runtime = ray.get_runtime_context()
        self.gcs_address, self.node_id = runtime.gcs_address, runtime.get_node_id()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.nodes = len(nodes)
        self._plan(models, [n.get("Resources", {}) for n in nodes])
        log.info("ray: %d node(s), %d worker(s) per model on %s, dashboard %s", self.nodes, self.workers,
                 f"{self.gpus_per_worker} GPU(s) each" if self.gpus_per_worker else "one CPU each",
                 self.dashboard or "off")

    def _plan(self, models: list[str], nodes: list[dict]) -> None:
        """Group size and workers per model from the nodes' resources; bad input named with what would fit."""
        gpus = [int(r.get("GPU", 0)) for r in nodes]
        largest = max(gpus, default=0)
        group = self.gpus_per_worker
        if group is None:
            group = 1 if largest else 0
        if group < 0 or group > MAX_GROUP:
            raise InvalidRequestError("ray_gpus_per_worker", f"{group} GPUs per engine is not supported (larger "
                                      "groups would need CFG/Ulysses across actors: use artifex launch)",
                                      list(range(MAX_GROUP + 1)))
        if group > largest:
            raise InvalidRequestError("ray_gpus_per_worker", f"a group of {group} GPU(s) is larger than the GPUs "
                                      f"of any node (the largest has {largest})",
                                      list(range(min(largest, MAX_GROUP) + 1)))
        slots = sum(g // group for g in gpus) if group else sum(int(r.get("CPU", 0)) for r in nodes)
        workers = self.workers
        if workers is None:
            workers = max(1, slots // len(models)) if group else 1
        if workers < 1:
            raise InvalidRequestError("ray_workers", f"must be >= 1, got {workers}")
        if workers * len(models) > slots:
            what = f"groups of {group} GPU(s)" if group else "CPUs"
            raise InvalidRequestError("ray_workers", f"{workers} worker(s) x {len(models)} model(s) need "
                                      f"{workers * len(models)} {what}; the cluster holds {slots}",
                                      f"at most {max(slots // len(models), 0)} per model")
        self.gpus_per_worker, self.workers = group, workers

    def started(self, models: list[str]) -> RayPool:
        self.start(models)
        return self

    def executors(self, model: str) -> list[RayExecutor]:
        return [RayExecutor(self, model, i) for i in range(self.workers)]

    def info(self) -> dict:
        return {"kind": self.kind, "address": self.gcs_address or self.address, "dashboard": self.dashboard,
                "nodes": self.nodes, "workers_per_model": self.workers, "gpus_per_worker": self.gpus_per_worker}

    def placement(self) -> dict:
        """Actor options that place one engine: its GPUs (a PACK placement group for two), or one CPU."""
        ray = import_ray()
        group = self.gpus_per_worker
        if group <= 1:
            return {"num_gpus": group, "num_cpus": 1}
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = placement_group([{"GPU": group, "CPU": 1}], strategy="PACK")
        self._groups.append(pg)
        try:
            ray.get(pg.ready(), timeout=PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(pg)  # not left pending, to take GPUs later
            self._groups.remove(pg)
            raise ExecutorLost(f"no node had {group} free GPUs for {PLACE_TIMEOUT_S:.0f} s") from None
        return {"num_gpus": group, "num_cpus": 1,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)}

    def shutdown(self) -> None:
        ray = import_ray()
        for pg in self._groups:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # the cluster is already gone
                pass
        self._groups.clear()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()


class RayExecutor(Executor):
    """The ``Executor`` of one Ray actor, with Ray's errors that mean the actor is gone turned into ``ExecutorLost``."""

    kind = "ray"

    def __init__(self, pool: RayPool, model: str, index: int):
        super().__init__()
        self.pool, self.model, self.index = pool, model, index
        self.actor = None
        self.options: dict | None = None  # placement, kept across restarts (a placement group is reused)
        self.ship = False
        self.identity = {"kind": "ray", "node": None, "pid": None, "gpus": []}

    def _call(self, method: str, *args, timeout: float | None = None):
        ray = import_ray()
        if self.actor is None:
            raise ExecutorLost("no actor")
        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)
        except _lost_errors() as e:
            raise _lost(e) from None

    def load(self, model, checkpoint=None, config=None, single_files=None) -> float:
        ray = import_ray()
        t0 = time.perf_counter()
        self.model = model
        if self.options is None:
            self.options = self.pool.placement()
        actor_class = ray.remote(EngineActor)
        self.actor = actor_class.options(name=f"artifex-{model}-{self.index}-{uuid.uuid4().hex[:8]}",
                                         max_concurrency=4, max_restarts=0, **self.options).remote(
            self.pool.gpus_per_worker)
        try:
            self.identity = self._call("identity", timeout=PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ExecutorLost(f"the actor was not placed within {PLACE_TIMEOUT_S:.0f} s") from None
        ship = self.pool.ship_outputs
        self.ship = self.identity["node_id"] != self.pool.node_id if ship is None else ship
        log.info("worker %s/%d: actor pid %s on %s (GPUs %s)", model, self.index, self.identity["pid"],
                 self.identity["node"], self.identity["gpus"] or "none", extra={"model": model})
        result = self._call("load", model, checkpoint, config, single_files)
        if "error" in result:
            raise ArtifexError(result["error"])
        self.imports_s = result.get("imports_s")
        return time.perf_counter() - t0

    def warm_up(self, shapes=None, should_stop=lambda: False) -> float:
        return self._call("warm_up", shapes)

    def generate(self, request, on_event=None, output_dir=None):
        ray = import_ray()
        inputs = {}
        if self.ship:  # the actor is on another node: the request's files travel as bytes
            for field in SHIPPED_INPUTS:
                if getattr(request, field, None):
                    path = Path(getattr(request, field))
                    inputs[field] = (path.name, path.read_bytes())
        call_id = uuid.uuid4().hex
        seen, cancelled = 0, False
        report, report_due = None, time.monotonic() + REPORT_EVERY_S

        def forward(events) -> None:
            nonlocal seen, cancelled
            for event in events:
                seen += 1
                if cancelled or on_event is None:
                    continue
                try:
                    on_event(event)
                except GenerationCancelled:
                    cancelled = True
                    self.actor.cancel.remote(call_id)

        try:
            ref = self.actor.generate.remote(call_id, request, None if output_dir is None else str(output_dir),
                                             inputs or None, self.ship)
            while True:
                done, _ = ray.wait([ref], timeout=POLL_S)
                if done:
                    outcome = ray.get(ref)
                    break
                try:
                    forward(ray.get(self.actor.progress.remote(call_id, seen), timeout=30))
                except ray.exceptions.GetTimeoutError:
                    pass
                if report is None and time.monotonic() >= report_due:  # memory mid-request, without waiting for it
                    report = self.actor.health.remote()
                elif report is not None and ray.wait([report], timeout=0)[0]:
                    self._report, report, report_due = ray.get(report), None, time.monotonic() + REPORT_EVERY_S
        except _lost_errors() as e:
            raise _lost(e) from None
        except ray.exceptions.RayTaskError as e:  # a bug around the engine, not the request's fault alone
            raise RemoteError("internal_error", str(e).splitlines()[0]) from None
        for event in outcome.pop("events", [])[seen:]:  # the last steps, finished before the last poll
            if on_event is not None and (event.stage == "done" or not cancelled):
                try:
                    on_event(event)
                except GenerationCancelled:
                    cancelled = True
        if "error" in outcome:
            raise RemoteError(**outcome["error"])
        if "cancelled" in outcome:
            raise GenerationCancelled(f"request {call_id} cancelled")
        result = outcome["result"]
        if cancelled:  # the cancel reached the actor after its last check: the job's files go, as on one machine
            if not self.ship:
                discard_outputs(result)
            raise GenerationCancelled(f"request {call_id} cancelled after its video was written")
        files = outcome.pop("files", None)
        if files is not None:  # from another node: the caller writes them where the request says
            from artifex.engine.outputs import default_output

            video = Path(request.output) if request.output else default_output(output_dir, self.model,
                                                                                 result.settings.seed)
            targets = {"video": video, "sidecar": video.with_suffix(".json")}
            for key, data in files.items():
                write_atomic(targets[key], data)
            result.video_path, result.sidecar_path = targets["video"], targets["sidecar"]
        return result

    def health(self) -> dict:
        ray = import_ray()
        try:
            self._report = self._call("health", timeout=30)
            return self._report
        except ray.exceptions.GetTimeoutError:
            raise ExecutorLost("the actor did not answer its health check within 30 s") from None

    def close(self) -> None:
        ray = import_ray()
        if self.actor is not None:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # already dead, or the cluster is gone
                pass
            self.actor = None
