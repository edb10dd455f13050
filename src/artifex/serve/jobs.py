"""The job table: SQLite in WAL mode, one row per job, the only durable state of the server.

States: queued -> running -> succeeded | failed | cancelled; a succeeded job whose files
were evicted by the disk cap becomes expired. A job found ``running`` at start-up was
interrupted (crash, kill -9): it goes back to the queue in its old place and runs again.

Every method takes the store's lock and runs one transaction, so the queue bound and the
de-duplication check hold under any number of concurrent submissions.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled", "expired")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    settings TEXT NOT NULL,
    warnings TEXT NOT NULL DEFAULT '[]',
    image TEXT,
    dedup_key TEXT,
    api TEXT NOT NULL DEFAULT 'artifex',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expired_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    timings TEXT,
    output_bytes INTEGER NOT NULL DEFAULT 0,
    audio TEXT,
    pose_video TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, model, seq);
CREATE INDEX IF NOT EXISTS jobs_dedup ON jobs(dedup_key);
"""
# Columns added after the first release: a data directory made by an older server gains them at start-up.
_ADDED_COLUMNS = {"audio": "TEXT", "pose_video": "TEXT"}
# The columns naming a job's uploads (file names under the uploads directory).
UPLOAD_COLUMNS = ("image", "audio", "pose_video")


class QueueFull(Exception):
    def __init__(self, depth: int):
        self.depth = depth
        super().__init__(f"the queue is full ({depth} jobs waiting)")


@dataclass
class Job:
    seq: int
    id: str
    model: str
    state: str
    request: dict
    settings: dict
    warnings: list
    image: str | None  # file name under the uploads directory
    dedup_key: str | None
    api: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    expired_at: float | None
    attempts: int
    cancel_requested: bool
    error: dict | None
    timings: dict | None
    output_bytes: int
    audio: str | None = None  # S2V: the audio's file name under the uploads directory
    pose_video: str | None = None  # S2V: the pose video's

    @property
    def uploads(self) -> list[str]:
        """The file names under the uploads directory this job needs until it ends."""
        return [name for name in (self.image, self.audio, self.pose_video) if name]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        for key in ("request", "settings", "warnings", "error", "timings"):
            d[key] = json.loads(d[key]) if d[key] is not None else None
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


def _strict(value: Any) -> str:
    """JSON as every reader accepts it: a NaN or an infinity here is a bug upstream, not something to store."""
    return json.dumps(value, allow_nan=False)


def new_job_id() -> str:
    return "video_" + uuid.uuid4().hex


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the client hears about it
        self._db.executescript(_SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- helpers -----------------------------------------------------------------------------
    def _tx(self):
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self, kind, exc, tb):
                try:
                    store._db.execute("COMMIT" if kind is None else "ROLLBACK")
                finally:
                    store._lock.release()

        return _Tx()

    def _one(self, sql: str, args: tuple = ()) -> Job | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return Job.from_row(row) if row else None

    # -- submission --------------------------------------------------------------------------
    def submit(self, *, model: str, request: dict, settings: dict, warnings: list, image: str | None,
               dedup_key: str | None, api: str, max_queue: int, audio: str | None = None,
               pose_video: str | None = None) -> tuple[Job, bool]:
        """Insert a queued job, or return the stored job of an identical request.

        Returns (job, created). Raises ``QueueFull`` when ``max_queue`` jobs already wait.
        """
        with self._tx() as db:
            if dedup_key:
                row = db.execute(
                    "SELECT * FROM jobs WHERE dedup_key = ? AND state IN ('queued', 'running', 'succeeded') "
                    "ORDER BY seq DESC LIMIT 1", (dedup_key,)).fetchone()
                if row:
                    return Job.from_row(row), False
            depth = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if depth >= max_queue:
                raise QueueFull(depth)
            job_id = new_job_id()
            db.execute(
                "INSERT INTO jobs (id, model, state, request, settings, warnings, image, dedup_key, api, created_at, "
                "audio, pose_video) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, model, _strict(request), _strict(settings), _strict(warnings), image, dedup_key, api,
                 time.time(), audio, pose_video))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return Job.from_row(row), True

    # -- the worker's side -------------------------------------------------------------------
    def claim(self, model: str) -> Job | None:
        """The oldest queued job of ``model``, now running (attempts + 1); None if there is none."""
        with self._tx() as db:
            row = db.execute("SELECT seq FROM jobs WHERE state = 'queued' AND model = ? ORDER BY seq LIMIT 1",
                             (model,)).fetchone()
            if not row:
                return None
            db.execute("UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1 WHERE seq = ?",
                       (time.time(), row[0]))
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE seq = ?", (row[0],)).fetchone())

    def finish(self, job_id: str, state: str, *, error: dict | None = None, timings: dict | None = None,
               output_bytes: int = 0) -> Job | None:
        """Move a running job to a terminal state. None if the job is gone (deleted meanwhile)."""
        assert state in TERMINAL
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ?, timings = ?, output_bytes = ? "
                "WHERE id = ? AND state = 'running'",
                (state, time.time(), _strict(error) if error else None, _strict(timings) if timings else None,
                 output_bytes, job_id))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return Job.from_row(row) if row else None

    def requeue(self, job_id: str) -> None:
        """A running job stopped by a shutdown goes back to its place in the queue."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'queued', started_at = NULL WHERE id = ? AND state = 'running'",
                       (job_id,))

    def retry(self, job_id: str, error: dict, max_attempts: int) -> str | None:
        """A running attempt failed through no fault of the job (its worker died): queue it again in its old
        place, or fail it after ``max_attempts`` attempts, or cancel it if that was asked. Returns the new state."""
        with self._tx() as db:
            row = db.execute("SELECT attempts, cancel_requested FROM jobs WHERE id = ? AND state = 'running'",
                             (job_id,)).fetchone()
            if row is None:
                return None
            attempts, cancel = row
            give_up = {**error, "message": f"{error['message']} (attempt {attempts} of {max_attempts}; "
                                           "not trying again)"}
            return self._settle(db, job_id, cancel, give_up if attempts >= max_attempts else None)

    def recover(self, max_attempts: int) -> dict[str, list[str]]:
        """At start-up: jobs left ``running`` by a crash are queued again (or cancelled/failed)."""
        out: dict[str, list[str]] = {"requeued": [], "cancelled": [], "failed": []}
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts, cancel_requested FROM jobs WHERE state = 'running'").fetchall()
            for job_id, attempts, cancel in rows:
                give_up = {"code": "interrupted", "message": f"the server stopped during this job {attempts} times; "
                                                             "not trying again"}
                state = self._settle(db, job_id, cancel, give_up if attempts >= max_attempts else None)
                out["requeued" if state == "queued" else state].append(job_id)
        return out

    @staticmethod
    def _settle(db, job_id: str, cancel: bool, give_up: dict | None) -> str:
        """A running job whose attempt ended through no fault of its own: cancelled if that was asked, failed with
        the error ``give_up`` when its attempts are spent, else queued again in its old place. Returns the state."""
        if cancel:
            db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?", (time.time(), job_id))
            return "cancelled"
        if give_up is not None:
            db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE id = ?",
                       (time.time(), json.dumps(give_up), job_id))
            return "failed"
        db.execute("UPDATE jobs SET state = 'queued', started_at = NULL WHERE id = ?", (job_id,))
        return "queued"

    def fail_queued(self, model: str, error: dict) -> list[str]:
        """Fail every queued job of ``model`` (its engine could not be loaded)."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'queued' AND model = ?", (model,))]
            db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error = ? "
                       "WHERE state = 'queued' AND model = ?", (time.time(), json.dumps(error), model))
        return ids

    # -- the client's side -------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def cancel(self, job_id: str) -> Job | None:
        """Queued: cancelled at once. Running: flagged; the worker stops it between steps."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ? AND state = 'queued'",
                       (time.time(), job_id))
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job_id,))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return Job.from_row(row) if row else None

    def delete(self, job_id: str) -> Job | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return Job.from_row(row) if row else None

    def list_jobs(self, *, state: str | None = None, model: str | None = None, limit: int = 20, offset: int = 0,
             after_seq: int | None = None, newest_first: bool = True) -> tuple[list[Job], int]:
        where, args = [], []
        if state:
            where.append("state = ?")
            args.append(state)
        if model:
            where.append("model = ?")
            args.append(model)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        page_where = list(where)
        page_args: list[Any] = list(args)
        if after_seq is not None:
            page_where.append("seq < ?" if newest_first else "seq > ?")
            page_args.append(after_seq)
        page_clause = (" WHERE " + " AND ".join(page_where)) if page_where else ""
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs{clause}", args).fetchone()[0]
            rows = self._db.execute(f"SELECT * FROM jobs{page_clause} ORDER BY seq {order} LIMIT ? OFFSET ?",
                                    (*page_args, limit, offset)).fetchall()
        return [Job.from_row(r) for r in rows], total

    def counts(self, model: str | None = None) -> dict[str, int]:
        """Jobs in each state (of ``model``, if given)."""
        where, args = (" WHERE model = ?", (model,)) if model else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT state, COUNT(*) FROM jobs{where} GROUP BY state", args).fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({s: n for s, n in rows})
        return out

    def queue_depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]

    def queued_by_model(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT model, COUNT(*) FROM jobs WHERE state = 'queued' GROUP BY model"
                                         ).fetchall())

    RECENT_JOBS = 20

    def mean_recent_seconds(self, model: str, n: int | None = None) -> float | None:
        """Mean wall time (started to finished) of the last ``n`` jobs of ``model`` that ran to an end of their
        own (succeeded, later expired, or failed); None before the first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT finished_at - started_at FROM jobs WHERE model = ? AND state IN ('succeeded', 'expired', "
                "'failed') AND started_at IS NOT NULL AND finished_at >= started_at ORDER BY finished_at DESC "
                "LIMIT ?", (model, n or self.RECENT_JOBS)).fetchall()
        return sum(r[0] for r in rows) / len(rows) if rows else None

    def queue_position(self, job: Job) -> int:
        """How many jobs of the same model run before this queued one (0: next)."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE model = ? AND id != ? "
                "AND (state = 'running' OR (state = 'queued' AND seq < ?))", (job.model, job.id, job.seq)).fetchone()[0]

    def upload_in_use(self, name: str) -> bool:
        """Whether a queued or running job needs the upload ``name`` (as its image, audio or pose video)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE state IN ('queued', 'running') AND "
                                    "(image = ? OR audio = ? OR pose_video = ?) LIMIT 1",
                                    (name, name, name)).fetchone() is not None

    def active_uploads(self) -> set[str]:
        """The uploads queued and running jobs need (images, audio, pose videos)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(UPLOAD_COLUMNS)} FROM jobs "
                                    "WHERE state IN ('queued', 'running')").fetchall()
        return {name for row in rows for name in row if name}

    # -- the disk cap ------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(output_bytes), 0) FROM jobs WHERE state = 'succeeded'"
                                    ).fetchone()[0]

    def evict(self, cap: int, keep: str | None = None) -> list[Job]:
        """Mark the oldest finished results expired until the kept bytes fit ``cap``; returns them.

        The newest result (``keep``) is never evicted, so a job always leaves its video behind.
        """
        evicted: list[Job] = []
        with self._tx() as db:
            total = db.execute("SELECT COALESCE(SUM(output_bytes), 0) FROM jobs WHERE state = 'succeeded'"
                               ).fetchone()[0]
            if total <= cap:
                return evicted
            rows = db.execute("SELECT * FROM jobs WHERE state = 'succeeded' AND id != ? ORDER BY finished_at, seq",
                              (keep or "",)).fetchall()
            now = time.time()
            for row in rows:
                if total <= cap:
                    break
                db.execute("UPDATE jobs SET state = 'expired', expired_at = ? WHERE seq = ?", (now, row["seq"]))
                total -= row["output_bytes"]
                evicted.append(Job.from_row(row))
        return evicted
