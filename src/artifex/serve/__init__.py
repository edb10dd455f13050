"""``artifex serve``: the HTTP door to the engine.

One executor per served model (this process; a layout's ranks, ``--layout``; or several Ray actors, ``--ray``),
each driven by one worker thread;
jobs live in SQLite in the data directory, so a restart loses nothing. The HTTP layer
only validates requests into the engine's ``GenerationRequest``, stores them, and reads
back state; it never waits on a generation.

  settings.py  ServeSettings: address, models, data dir, limits (CLI flags and ``[serve]`` in TOML)
  jobs.py      JobStore: the SQLite (WAL) job table, queue bound, de-duplication, disk cap
  worker.py    ModelWorker (bring up an engine through its executor, run jobs, retry a dead worker's job)
  progress.py  LiveProgress (in-memory progress, ETAs, cancel flags)
  inputs.py    request bodies (JSON, multipart, OpenAI shape) -> GenerationRequest; upload checks
  auth.py      bearer token: where it comes from, loopback rule for --no-auth
  metrics.py   Prometheus text: queue, jobs by state, stage durations, NVML GPU figures
  app.py       the FastAPI application
  monitor.py   ``artifex monitor``: the same figures live in a terminal
  client.py    ``artifex submit``: one job from the terminal, its mp4 downloaded (no torch imported)
"""
