"""Training: config (config.py), deterministic resumable data (data.py), optimiser and schedule (optim.py),
atomic checkpoints (checkpoint.py) and the loop itself (trainer.py). `neuclip/launch.py` runs it in-process or
through submitit."""
