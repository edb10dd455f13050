"""Workers as Ray actors: one warm engine per GPU group, placed and watched by Ray, fed by the serve job loop.

    executor = RayExecutor("auto", workers=2, gpus_per_worker=1)
    executor.start(["ti2v-5b"])                              # connect; check the cluster can hold every group
    service = Service(settings, config, token, executor)     # one ModelWorker thread per actor

The seam is the serve executor's (``artifex.serve.worker``): ``start`` connects and plans,
``runners`` gives one ``RayRunner`` per actor, and each runner has the job loop's five
methods (load, warm_up, run, health, restart). Each actor (``EngineActor``) holds one
``Engine``; loading, warming up, generating, progress, cancel and health are its named
methods. A worker thread pulls the oldest queued job whenever its actor is free, so jobs
spread over every actor of every node (data parallel). Ray places an actor on
``num_gpus = group size`` (a placement group of one bundle, PACK, for groups of two GPUs;
the engine is then split over them with ``artifex.distributed.split``), or on one CPU when
the cluster has no GPUs. Any Ray error that means the actor is gone becomes ``WorkerLost``:
the job store counts a failed attempt and queues the job again, another actor takes it,
and this worker replaces its actor.

Files: an actor on the server's node reads the upload and writes the mp4 and its sidecar
straight into the data directory; an actor on another node gets the image's bytes, writes
into a temporary directory of its own and returns the files' bytes, which the server
writes into the data directory (atomically). Progress: the actor keeps each running job's
events and the server polls them while it waits, forwarding each to the job.
"""

from __future__ import annotations

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
from artifex.distributed.cluster import dashboard_url, import_ray, use_cluster_token
from artifex.errors import ArtifexError, GenerationCancelled, InvalidRequestError
from artifex.serve.service import write_atomic
from artifex.serve.settings import ServeSettings
from artifex.serve.worker import ProgressFn, WorkerLost, process_report, run_generation, warm_up_engine

log = logging.getLogger("artifex.serve")

POLL_S = 0.2  # how often the server asks a busy actor for progress
REPORT_EVERY_S = 5.0  # and for its memory and load
PLACE_TIMEOUT_S = 300.0  # an actor (or its GPU group) not placed in this time counts as lost
MAX_GROUP = 2  # GPUs one engine can use: 1, or 2 through the two-device split


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors that mean the actor (its process, its node) is gone."""
    import ray.exceptions as E

    names = ("RayActorError", "WorkerCrashedError", "ObjectLostError", "NodeDiedError", "OutOfMemoryError",
             "LocalRayletDiedError", "ActorUnschedulableError")
    return tuple(getattr(E, n) for n in names if hasattr(E, n))


def _lost(e: BaseException) -> WorkerLost:
    """A Ray error of ``_lost_errors`` as ``WorkerLost``, named with its first line."""
    return WorkerLost(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


# -- inside the actor ---------------------------------------------------------------------------
class EngineActor:
    """One warm ``Engine`` in a Ray actor process (threaded: progress, cancel and health answer mid-job)."""

    def __init__(self, model: str, checkpoint: str | None, config: OptimizationConfig, gpus: int):
        self.model, self.checkpoint, self.config, self.gpus = model, checkpoint, config, gpus
        self.engine = None
        self._lock = threading.Lock()
        self._events: dict[str, list[tuple[str, int, int]]] = {}
        self._cancel: set[str] = set()

    def identity(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"kind": "ray", "node": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(),
                "actor_id": ctx.get_actor_id(), "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def load(self) -> dict:
        """Load the engine (and split it over two GPUs for a group of two): {"load_s"} or {"error"}."""
        from artifex.engine.pipeline import Engine

        t0 = time.perf_counter()
        try:
            self.engine = Engine.load(self.model, checkpoint=self.checkpoint, config=self.config)
            if self.gpus == 2:
                from artifex.distributed.split import split_across_devices

                split_across_devices(self.engine, ("cuda:0", "cuda:1"))
        except ArtifexError as e:
            return {"error": str(e)}
        log.info("loaded %s in a Ray actor; plan: %s", self.model, self.engine.plan.to_dict())
        return {"load_s": time.perf_counter() - t0}

    def warm_up(self, shapes) -> float:
        t0 = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="artifex-warmup-"))
        try:
            warm_up_engine(self.engine, folder, shapes, lambda: False)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return time.perf_counter() - t0

    def generate(self, job_id: str, fields: dict, image: tuple[str, bytes] | None, ship: bool) -> dict:
        """Run one job. ``image``: (name, bytes) when the upload is on another node; ``ship``: write into a
        temporary directory and return the files' bytes (``outcome["files"]``) instead of writing ``output``."""
        events: list[tuple[str, int, int]] = []
        with self._lock:
            self._events[job_id] = events
        work = Path(tempfile.mkdtemp(prefix="artifex-job-")) if (image or ship) else None
        fields = dict(fields)
        if image is not None:
            (work / image[0]).write_bytes(image[1])
            fields["image"] = str(work / image[0])
        if ship:
            fields["output"] = str(work / Path(fields["output"]).name)

        def on_progress(stage: str, step: int, total: int) -> None:
            if stage != "done" and job_id in self._cancel:
                raise GenerationCancelled(f"job {job_id} cancelled at {stage}")
            events.append((stage, step, total))

        try:
            outcome = run_generation(self.engine, fields, on_progress)
            if ship and outcome["state"] == "succeeded":
                outcome["files"] = {key: Path(outcome[key]).read_bytes() for key in ("video", "sidecar")}
            outcome["events"] = list(events)
            return outcome
        finally:
            with self._lock:
                self._events.pop(job_id, None)
                self._cancel.discard(job_id)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)

    def progress(self, job_id: str, since: int) -> list[tuple[str, int, int]]:
        with self._lock:
            return list(self._events.get(job_id, [])[since:])

    def cancel(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._events:
                self._cancel.add(job_id)

    def health(self) -> dict:
        devices = []
        if self.gpus:
            import torch

            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        return process_report(devices)


# -- on the server ----------------------------------------------------------------------------
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


class RayExecutor:
    """Engines in Ray actors: ``workers`` per served model, each on ``gpus_per_worker`` GPUs (0: one CPU)."""

    kind = "ray"

    def __init__(self, address: str = "auto", workers: int | None = None, gpus_per_worker: int | None = None,
                 ship_outputs: bool | None = None):
        """``ship_outputs``: True sends files through Ray even on the server's node (None: only from other nodes)."""
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

    def runners(self, model: str, settings: ServeSettings, config: OptimizationConfig) -> list[RayRunner]:
        return [RayRunner(self, model, i, settings, config) for i in range(self.workers)]

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
            raise WorkerLost(f"no node had {group} free GPUs for {PLACE_TIMEOUT_S:.0f} s") from None
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


class RayRunner:
    """The server's handle on one actor: what ``ModelWorker`` calls, with Ray's errors turned into ``WorkerLost``."""

    def __init__(self, executor: RayExecutor, model: str, index: int, settings: ServeSettings,
                 config: OptimizationConfig):
        self.executor, self.model, self.index, self.settings, self.config = executor, model, index, settings, config
        self.actor = None
        self.options: dict | None = None  # placement, kept across restarts (a placement group is reused)
        self.ship = False
        self.identity: dict = {"kind": "ray", "node": None, "pid": None, "gpus": []}
        self.report: dict = {}  # the actor's last memory/load report: at health checks, and while it runs jobs

    def _call(self, method: str, *args, timeout: float | None = None):
        ray = import_ray()
        if self.actor is None:
            raise WorkerLost("no actor")
        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)
        except _lost_errors() as e:
            raise _lost(e) from None

    def load(self) -> float:
        ray = import_ray()
        t0 = time.perf_counter()
        if self.options is None:
            self.options = self.executor.placement()
        group = self.executor.gpus_per_worker
        actor_class = ray.remote(EngineActor)
        self.actor = actor_class.options(name=f"artifex-{self.model}-{self.index}-{uuid.uuid4().hex[:8]}",
                                         max_concurrency=4, max_restarts=0, **self.options).remote(
            self.model, self.settings.checkpoints.get(self.model), self.config, group)
        try:
            self.identity = self._call("identity", timeout=PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise WorkerLost(f"the actor was not placed within {PLACE_TIMEOUT_S:.0f} s") from None
        ship = self.executor.ship_outputs
        self.ship = self.identity["node_id"] != self.executor.node_id if ship is None else ship
        log.info("worker %s/%d: actor pid %s on %s (GPUs %s)", self.model, self.index, self.identity["pid"],
                 self.identity["node"], self.identity["gpus"] or "none", extra={"model": self.model})
        result = self._call("load")
        if "error" in result:
            raise ArtifexError(result["error"])
        return time.perf_counter() - t0

    def warm_up(self, should_stop) -> float:
        return self._call("warm_up", self.settings.warmup_shapes)

    def run(self, job_id: str, fields: dict, on_progress: ProgressFn) -> dict:
        ray = import_ray()
        output = Path(fields["output"])
        image = None
        if self.ship and fields.get("image"):
            path = Path(fields["image"])
            image = (path.name, path.read_bytes())
        seen, cancelled = 0, False
        report, report_due = None, time.monotonic() + REPORT_EVERY_S

        def forward(events) -> None:
            nonlocal seen, cancelled
            for event in events:
                seen += 1
                if cancelled:
                    continue
                try:
                    on_progress(*event)
                except GenerationCancelled:
                    cancelled = True
                    self.actor.cancel.remote(job_id)

        try:
            ref = self.actor.generate.remote(job_id, fields, image, self.ship)
            while True:
                done, _ = ray.wait([ref], timeout=POLL_S)
                if done:
                    outcome = ray.get(ref)
                    break
                try:
                    forward(ray.get(self.actor.progress.remote(job_id, seen), timeout=30))
                except ray.exceptions.GetTimeoutError:
                    pass
                if report is None and time.monotonic() >= report_due:  # memory mid-job, without waiting for it
                    report = self.actor.health.remote()
                elif report is not None and ray.wait([report], timeout=0)[0]:
                    self.report, report, report_due = ray.get(report), None, time.monotonic() + REPORT_EVERY_S
        except _lost_errors() as e:
            raise _lost(e) from None
        except ray.exceptions.RayTaskError as e:  # a bug around the engine, not the job's fault alone
            return {"state": "failed", "error": {"code": "internal_error", "message": str(e).splitlines()[0]}}
        for event in outcome.pop("events", [])[seen:]:  # the last steps, finished before the last poll
            if event[0] == "done" or not cancelled:
                try:
                    on_progress(*event)
                except GenerationCancelled:
                    pass
        files = outcome.pop("files", None)
        if files is not None:  # from another node: the server writes them into its data directory
            targets = {"video": output, "sidecar": output.with_suffix(".json")}
            for key, data in files.items():
                write_atomic(targets[key], data)
                outcome[key] = str(targets[key])
        return outcome

    def health(self) -> dict:
        ray = import_ray()
        try:
            self.report = self._call("health", timeout=30)
            return self.report
        except ray.exceptions.GetTimeoutError:
            raise WorkerLost("the actor did not answer its health check within 30 s") from None

    def restart(self) -> None:
        """Drop the (dead or unresponsive) actor; the next ``load`` starts a fresh one in the same placement."""
        self.close()

    def close(self) -> None:
        ray = import_ray()
        if self.actor is not None:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # already dead, or the cluster is gone
                pass
            self.actor = None
