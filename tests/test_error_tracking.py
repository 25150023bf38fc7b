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
from neuclip.train.testing import tensors_equal, tiny_config

torch.set_num_threads(1)


def _curve(run) -> list[dict]:
    return [json.loads(line) for line in (run / "error_curve.jsonl").read_text().splitlines()]


def _final_state(run) -> dict:
    _, state = ckpt.load_latest(run / "checkpoints")
    return {k: state[k] for k in ("model", "optimizer", "estimator", "rng", "data")}


@pytest.mark.parametrize("method", ["fastclip", "openclip"])
def test_tracking_matches_error_run_and_leaves_the_run_unchanged(method, synth_data, tmp_path):
    from neuclip.train.trainer import train

    pattern = str(synth_data / "train" / "{00000..00002}.tar")
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
    from neuclip.train.trainer import train

    pattern = str(synth_data / "train" / "{00000..00002}.tar")
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
    from neuclip.train.trainer import train

    pattern = str(synth_data / "train" / "{00000..00002}.tar")
    train(tiny_config(tmp_path / "run", pattern, **{"method.name": "siglip", "train.max_steps": 4, "error.every": 2}))
    assert not (tmp_path / "run" / "error_curve.jsonl").exists()
    assert "siglip keeps no normaliser estimate" in capsys.readouterr().err


@pytest.mark.parametrize(("key", "value"), [("error.every", -1), ("error.anchors", 0), ("error.shards", 0)])
def test_bad_error_settings_are_named(key, value, synth_data, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(tmp_path / "run", str(synth_data / "train" / "*.tar"), **{key: value})


def _rows_of(ids, at):
    """Rows that say which id they belong to: (id, 1) at columns at, at+1 of a 4-wide zero row."""
    rows = torch.zeros(ids.numel(), 4)
    rows[:, at], rows[:, at + 1] = ids.float(), 1.0
    return rows


def _gather_worker(rank, world, port, out_dir):
    import os

    import torch.distributed as dist

    from neuclip.error_study.tracking import _gather_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        counts = {0: 3, 1: 0, 2: 5}  # uneven, and one rank with no shard at all
        ids = torch.arange(rank, 100, world)[: counts[rank]].flip(0)  # interleaved ids, out of order
        local = None
        if counts[rank]:
            local = (_rows_of(ids, 0), _rows_of(ids, 2), ids)
        rows = _gather_rows(local, 4, "cpu", world)
        if rank == 0:
            torch.save(rows, os.path.join(out_dir, "rows.pt"))
        else:
            assert rows is None
    finally:
        dist.destroy_process_group()


def test_gather_rows_from_uneven_and_empty_ranks(tmp_path):
    import torch.multiprocessing as mp

    from tests.test_estimators_distributed import free_port

    mp.spawn(_gather_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    image, text, ids = torch.load(tmp_path / "rows.pt", weights_only=True)
    want = torch.tensor(sorted([0, 3, 6] + [2, 5, 8, 11, 14]))
    assert torch.equal(ids, want)
    # rows travel with their ids and come back unit-normalised
    torch.testing.assert_close(image, torch.nn.functional.normalize(_rows_of(want, 0), dim=1))
    torch.testing.assert_close(text, torch.nn.functional.normalize(_rows_of(want, 2), dim=1))
