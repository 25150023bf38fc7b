"""Training: config (config.py), deterministic resumable data (data.py), optimiser and schedule (optim.py),
atomic checkpoints (checkpoint.py) and the loop (trainer.py, whose docstring lists the modules it is built
from). `neuclip/jobs/launch.py` runs it in-process or through submitit."""
