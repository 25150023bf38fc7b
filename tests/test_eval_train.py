"""The whole chain learns: synthetic data -> `neuclip train` (openclip, tiny-cnn) -> `neuclip eval --suite tiny`.

Measured on this CPU (one thread, shared machine; 600 steps at batch 64, lr 2e-3; 1024 samples per eval set):
tiny-vit (ViT, patch 8) learns colour but barely shape: shape top-1 0.203 (chance 1/6), colour 0.98. tiny-cnn
(open_clip's ModifiedResNet, layers [1, 1, 1, 1], width 16, 32 px) learns shape too: shape 0.306 / 0.326
(seeds 0 / 1), colour 0.996 / 0.999, position 0.34 / 0.31 (chance 1/9, noisy across runs), retrieval recall@1
0.25 / 0.21; training takes about 140 s (about 280 samples/s vs 357 for tiny-vit). More steps (900: 0.327),
lr 4e-3, batch 128, 4x the training data, width 8 / 24, 64 px input or deeper early stages all stayed at
0.21-0.33. So shape is asserted at chance + 0.07 (about halfway to the measured values, 6 standard errors of
chance at n = 1024).
"""

from __future__ import annotations

import json

import pytest
import torch

from neuclip.data.synth import COLOURS, SHAPES, synthesize
from neuclip.eval.runner import evaluate_suite

NUM_EVAL = 1024


@pytest.mark.slow
def test_briefly_trained_model_beats_chance(tmp_path):
    torch.set_num_threads(1)
    from neuclip.cli import main

    data = tmp_path / "data"
    synthesize(data, num_train=4096, num_eval=NUM_EVAL, seed=0)
    run = tmp_path / "run"
    overrides = {
        "run_dir": run,
        "model": "tiny-cnn",
        "data.train_shards": data / "train" / "{00000..00003}.tar",
        "method.name": "openclip",
        "train.global_batch_size": 64,
        "train.max_steps": 600,
        "train.lr": 0.002,
        "train.warmup_steps": 30,
        "train.threads": 1,
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.checkpoint_every": 10000,
        "train.log_every": 100,
    }
    assert main(["train", *(f"{k}={v}" for k, v in overrides.items())]) == 0
    assert json.loads((run / "done.json").read_text())["steps"] == 600

    summary = evaluate_suite(run / "model", "tiny", data, run / "eval", batch_size=256, workers=0, device="cpu")
    value = {task: entry["value"] for task, entry in summary["tasks"].items()}
    assert value["synth_colour"] >= 1 / len(COLOURS) + 0.5, value
    assert value["synth_shape"] >= 1 / len(SHAPES) + 0.07, value  # chance + ~6 standard errors
    assert value["synth_retrieval"] >= 20 / NUM_EVAL, value  # chance recall@1 is about 1 / NUM_EVAL
    assert summary["groups"]["tiny"] == pytest.approx(sum(value.values()) / 4)
