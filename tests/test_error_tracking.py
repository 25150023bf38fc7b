"""Normaliser error tracked during training (`error.every`): it measures what `neuclip error run` measures,
never changes the run, and survives a resume without gaps or repeats."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from neuclip.error_study.run_error import score_run
from neuclip.train import checkpoint as ckpt
from neuclip.train.config import ConfigError
from neuclip.train.testing import tensors_equal, tiny_config, train_pattern

torch.set_num_threads(1)


def _curve(run) -> list[dict]:
    return [json.loads(line) for line in (run / "error_curve.jsonl").read_text().splitlines()]


def _final_state(run) -> dict:
    _, state = ckpt.load_latest(run / "checkpoints")
    return {k: state[k] for k in ("model", "optimizer", "estimator", "rng", "data")}


@pytest.mark.parametrize("method", ["fastclip", "openclip"])
def test_tracking_matches_error_run_and_leaves_the_run_unchanged(method, synth_data, tmp_path):
    from neuclip.error_study.tracking import train

    pattern = train_pattern(synth_data)
    common = {"method.name": method, "train.max_steps": 10, "error.anchors": 20}
    train(tiny_config(tmp_path / "off", pattern, **common))
    train(tiny_config(tmp_path / "on", pattern, **common, **{"error.every": 4}))

    assert tensors_equal(_final_state(tmp_path / "off"), _final_state(tmp_path / "on")) == []
    assert not (tmp_path / "off" / "error_curve.jsonl").exists()
    curve = _curve(tmp_path / "on")
    assert [r["step"] for r in curve] == [4, 8, 10]  # every 4 steps and the last one
    assert all(r["n"] == 48 and r["anchors"] == 20 and r["mse_log"] >= 0 for r in curve)

    # the last point is the same measurement as `neuclip error run` on the final checkpoint (seed = run seed)
    row = score_run(tmp_path / "on", anchors=20, seed=0)
    for key in ("mse_log_1", "mse_log_2", "mean_rel_err", "alpha_star_mean", "tau", "coverage"):
        assert curve[-1][key] == pytest.approx(row[key], rel=1e-5, abs=1e-7), key


def test_resume_keeps_one_point_per_step(synth_data, tmp_path):
    from neuclip.error_study.tracking import train

    pattern = train_pattern(synth_data)
    cfg = tiny_config(tmp_path / "run", pattern, **{"method.name": "neuclip", "error.every": 3, "error.anchors": 16})
    train(cfg)
    full = _curve(tmp_path / "run")
    # back to the step-8 checkpoint, as after a kill at step 9 (the measurement at 9 was written, the
    # checkpoint at 12 was not)
    run = tmp_path / "run"
    (run / "done.json").unlink()
    shutil.rmtree(run / "model")
    (run / "checkpoints" / ckpt.checkpoint_path(run / "checkpoints", 12).name).unlink()
    train(cfg)
    again = _curve(run)
    assert [r["step"] for r in again] == [3, 6, 9, 12]
    for a, b in zip(full, again):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_method_without_estimate_writes_no_curve(synth_data, tmp_path, capsys):
    from neuclip.error_study.tracking import train

    pattern = train_pattern(synth_data)
    train(tiny_config(tmp_path / "run", pattern, **{"method.name": "siglip", "train.max_steps": 4, "error.every": 2}))
    assert not (tmp_path / "run" / "error_curve.jsonl").exists()
    assert "siglip keeps no normaliser estimate" in capsys.readouterr().err


@pytest.mark.parametrize(("key", "value"), [("error.every", -1), ("error.anchors", 0), ("error.shards", 0)])
def test_bad_error_settings_are_named(key, value, synth_data, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(tmp_path / "run", str(synth_data / "train" / "*.tar"), **{key: value})


# Uneven ranks and a rank without data: tests/test_error_streaming.py (1, 2 and 3 processes against one).


def test_the_trainer_takes_tracking_as_a_hook_and_never_drops_it(synth_data, tmp_path):
    """The trainer does not import the error study: tracking reaches it as a hook (error_study.tracking.train,
    what a train job runs). Called bare with error.every set, it refuses instead of training unmeasured."""
    from neuclip.train.config import ConfigError
    from neuclip.train.testing import tiny_config
    from neuclip.train.trainer import train as bare_train

    cfg = tiny_config(tmp_path / "run", train_pattern(synth_data), **{"error.every": 4})
    with pytest.raises(ConfigError, match="error.every is set but no error tracker was given"):
        bare_train(cfg)
    assert not (tmp_path / "run").exists()
