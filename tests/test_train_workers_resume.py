"""The trainer end to end: a run resumed with another number of loader workers ends bit-identical."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import run_attempts, tensors_equal, tiny_config, train_pattern


@pytest.mark.slow  # loader worker processes
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_with_other_workers_is_bit_identical(synth_data, tmp_path):
    from neuclip.error_study.tracking import train

    shards = train_pattern(synth_data)
    extra = {"train.max_steps": 8, "train.checkpoint_every": 5, "train.keep_last": 3}
    straight = tiny_config(tmp_path / "straight", shards, **extra, **{"data.workers": 0})
    train(straight)

    cfg = tiny_config(tmp_path / "resumed", shards, **extra, **{"data.workers": 0})
    train(cfg)
    run = Path(cfg["run_dir"])  # back to its step-5 checkpoint, as if stopped there ...
    (run / "done.json").unlink()
    shutil.rmtree(run / "model")
    ckpt.checkpoint_path(run / "checkpoints", 8).unlink()
    cfg["data"]["workers"] = 2  # ... and resumed with two loader workers
    assert train(cfg)["steps"] == 8
    assert run_attempts(run)[-1]["resumed_from_step"] == 5

    def final(c):
        return torch.load(ckpt.checkpoint_path(Path(c["run_dir"]) / "checkpoints", 8), weights_only=True)

    a, b = final(straight), final(cfg)
    for part in ("model", "estimator", "optimizer", "rng", "data"):
        assert tensors_equal(a[part], b[part]) == [], part
    assert a["data"]["next_step"] == 8 and a["data"]["num_samples"] == 48
