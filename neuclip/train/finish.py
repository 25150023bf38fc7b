"""The end of a run: the trained model as an open_clip `local-dir:` folder (RUN/model) carrying the
estimator's temperature (and SigLIP's bias), and done.json, the run's last file."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from neuclip.atomic import write_json
from neuclip.train import checkpoint as ckpt
from neuclip.train.runfiles import now
from neuclip.train.setup import Geometry, Parts

DONE_FILE = "done.json"


def export_model(parts: Parts, model_name: str, out_dir: Path) -> None:
    """The estimator owns tau (and SigLIP's bias) during training; the exported model carries them."""
    from neuclip.export import save_model  # open_clip: imported only when a run finishes

    model, estimator = parts.model, parts.estimator
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / float(estimator.temperature())))
        bias = getattr(estimator, "logit_bias", None)
        if isinstance(getattr(model, "logit_bias", None), torch.Tensor) and isinstance(bias, torch.Tensor):
            model.logit_bias.copy_(bias.detach().reshape(model.logit_bias.shape))
    save_model(model, model_name, out_dir)


def write_done(
    run_dir: Path, cfg: dict, geo: Geometry, parts: Parts, *, last: dict, bad: dict, train_wall_s: float
) -> dict:
    """done.json from the last logged metrics line `last` and the loader's bad-sample counts `bad`."""
    total = geo.total_steps
    done = {
        "status": "done",
        "method": cfg["method"]["name"],
        "model": cfg["model"],
        "steps": total,
        "epochs": total / geo.steps_per_epoch,
        "samples_seen": total * geo.batch,
        "final_loss": last.get("loss"),
        "final_tau": float(parts.estimator.temperature()),
        **bad,
        "train_wall_s": round(train_wall_s, 3),
        "model_dir": "model",
        "checkpoint": ckpt.checkpoint_path(run_dir / "checkpoints", total).name,
        "finished": now(),
    }
    write_json(run_dir / DONE_FILE, done, indent=2)
    return done
