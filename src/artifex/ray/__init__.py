"""Ray: cluster commands' helpers (``cluster``) and engines as Ray actors (``executor``: ``RayPool``,
``RayExecutor``). Imports the engine, nothing of the server's; Ray itself is imported only when used."""
