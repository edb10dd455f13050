"""The samplers' names and the published few-step schedules: plain data (no torch), so a request is checked
before anything heavy is imported (``artifex.engine.samplers`` runs them)."""

SAMPLERS = ("unipc", "euler", "dmd")
NUM_TRAIN_TIMESTEPS = 1000  # Wan's training timesteps; euler/dmd timesteps are sigma * 1000
LIGHTNING_TIMESTEPS = (1000.0, 937.5, 833.3, 625.0)  # 4 steps, shift 5 (Lightning / LightX2V), rounded
FASTWAN_TIMESTEPS = (1000.0, 757.0, 522.0)  # FastWan2.2 DMD, 3 steps
