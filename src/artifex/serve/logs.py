"""Structured logs: one JSON object per line (time, level, logger, message, and job_id/model when known)."""

from __future__ import annotations

import json
import logging
import sys
import time

_EXTRA = ("job_id", "model", "status_code", "path", "method")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _EXTRA:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.threadName and record.threadName.startswith("artifex-worker"):
            out["thread"] = record.threadName
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(debug: bool, fmt: str = "json", level: str = "INFO") -> None:
    """Route every logger (ours, uvicorn's) to stderr in one format; ``debug`` lowers the level to DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    if not debug:  # libraries' debug chatter stays out of INFO logs
        for name in ("PIL", "multipart", "urllib3", "httpx", "asyncio"):
            logging.getLogger(name).setLevel(logging.WARNING)
