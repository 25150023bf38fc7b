"""`neuclip error run`: a trained run's own normaliser estimate scored against exact normalisers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neuclip.error_study.run_error import score_run
from neuclip.train.testing import tiny_config, train_pattern

torch.set_num_threads(1)


@pytest.mark.parametrize("method", ["fastclip", "openclip"])
def test_error_run_scores_the_runs_own_estimate(method, synth_data, tmp_path):
    from neuclip.error_study.tracking import train

    pattern = train_pattern(synth_data)
    cfg = tiny_config(tmp_path / "run", pattern, **{"method.name": method, "train.max_steps": 6})
    train(cfg)
    row = score_run(tmp_path / "run", anchors=20)
    assert row["method"] == method and row["n"] == 48 and row["anchors"] == 20 and row["step"] == 6
    assert math.isfinite(row["mse_log"]) and row["mse_log"] >= 0 and 0 < row["coverage"] <= 1
    assert json.loads((tmp_path / "run" / "error" / "error.json").read_text())["mse_log"] == row["mse_log"]
    if method == "fastclip":  # 6 steps of batch 16 over 48 samples: every sample visited at least once
        assert row["coverage"] == 1.0
