"""``artifex serve``: the HTTP door to the engine.

One engine per served model (or several Ray actors, ``--ray``), each driven by one worker thread;
jobs live in SQLite in the data directory, so a restart loses nothing. The HTTP layer
only validates requests into the engine's ``GenerationRequest``, stores them, and reads
back state; it never waits on a generation.

  settings.py  ServeSettings: address, models, data dir, limits (CLI flags and ``[serve]`` in TOML)
  jobs.py      JobStore: the SQLite (WAL) job table, queue bound, de-duplication, disk cap
  worker.py    ModelWorker (bring up an engine, run jobs, retry a dead worker's job), the local executor,
               LiveProgress (in-memory progress, cancel flags); Ray actors: distributed/ray_pool.py
  inputs.py    request bodies (JSON, multipart, OpenAI shape) -> GenerationRequest; upload checks
  auth.py      bearer token: where it comes from, loopback rule for --no-auth
  metrics.py   Prometheus text: queue, jobs by state, stage durations, NVML GPU figures
  app.py       the FastAPI application
  monitor.py   ``artifex monitor``: the same figures live in a terminal
  cli.py       ``add_commands``: registers ``serve`` and ``monitor``
"""
