"""Restart safety of the trainer: SIGKILL at a random step + rerun == uninterrupted run, bit for bit; NaN
stops with the step and quantity named and keeps the last good checkpoint; a corrupt shard is named or
skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import read_checkpoint, tensors_equal, tiny_config, train_pattern, write_config

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# The methods whose resume must be bit-exact; a method whose module is not written yet is skipped.
METHODS = {"openclip": "baselines.openclip", "fastclip": "baselines.fastclip", "neuclip": "neuclip.neuclip"}
OPTIONS = {"neuclip": {"num_prototypes": 64, "restart_every": 5}}  # small NPN, and a restart mid-run


def _final(run_dir: Path, step: int) -> dict:
    return read_checkpoint(run_dir / "checkpoints", step)  # per-sample state from its shard file included


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _options(method: str) -> dict:
    from neuclip.estimators.registry import estimator_class

    defaults = estimator_class(method).defaults
    return {k: v for k, v in OPTIONS.get(method, {}).items() if k in defaults}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_then_rerun_is_bit_identical(method, synth_data, tmp_path):
    if importlib.util.find_spec(METHODS[method]) is None:
        pytest.skip(f"module {METHODS[method]} (method {method!r}) does not exist yet")
    from neuclip.error_study.tracking import train

    steps = 16
    extra = {
        "method.name": method,
        "method.options": _options(method),
        "train.max_steps": steps,
        "train.checkpoint_every": 3,
    }
    ref_cfg = tiny_config(tmp_path / "ref", train_pattern(synth_data), **extra)
    train(ref_cfg)

    cfg = tiny_config(tmp_path / "run", train_pattern(synth_data), **extra)
    config_path = write_config(tmp_path / "run.yaml", cfg)
    kill_after = random.Random().randint(2, steps - 3)  # a fresh random step each time; printed on failure
    metrics = Path(cfg["run_dir"]) / "metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuclip.cli", "train", str(config_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            time.sleep(random.Random().uniform(0, 0.05))  # somewhere inside the next step
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = len(metrics.read_text().splitlines())
    assert not (Path(cfg["run_dir"]) / "done.json").exists()

    done = train(cfg)  # resumes from the newest checkpoint the killed run left
    assert done["steps"] == steps
    a, b = _final(Path(ref_cfg["run_dir"]), steps), _final(Path(cfg["run_dir"]), steps)
    for part in ("model", "estimator", "optimizer", "rng", "data"):
        assert tensors_equal(a[part], b[part]) == [], f"{part} differs after kill at step ~{killed_at}"
    assert _losses(Path(ref_cfg["run_dir"])) == _losses(Path(cfg["run_dir"]))
    from safetensors.torch import load_file

    ma = load_file(Path(ref_cfg["run_dir"]) / "model" / "open_clip_model.safetensors")
    mb = load_file(Path(cfg["run_dir"]) / "model" / "open_clip_model.safetensors")
    assert tensors_equal(ma, mb) == []


def _poison(estimator, at: int, what: str):
    """From step `at` on, `what` ("loss" or "stat") of the estimator's output becomes non-finite."""
    forward = estimator.forward

    def poisoned(batch):
        out = forward(batch)
        if batch.step >= at:
            if what == "loss":
                out.loss = out.loss * float("nan")
            else:
                out.stats["alpha1_mean"] = float("inf")
        return out

    estimator.forward = poisoned
    return estimator


@pytest.mark.parametrize("what", ["loss", "stat"])
def test_nan_stops_naming_step_and_quantity(what, synth_data, tmp_path, monkeypatch, capsys):
    import neuclip.estimators.registry as registry
    from neuclip.cli import main

    real = registry.build_estimator
    monkeypatch.setattr(registry, "build_estimator", lambda *a, **k: _poison(real(*a, **k), 5, what))
    cfg = tiny_config(tmp_path / "run", train_pattern(synth_data), **{"train.checkpoint_every": 2})
    status = main(["train", str(write_config(tmp_path / "c.yaml", cfg))])
    err = capsys.readouterr().err
    assert status != 0
    quantity = "loss is nan" if what == "loss" else "'alpha1_mean' is inf"
    assert quantity in err and "at step 6 " in err, err
    run = Path(cfg["run_dir"])
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 4]
    assert not (run / "done.json").exists()
    state = _final(run, 4)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def _corrupt_header(path: Path, member_index: int) -> None:
    with tarfile.open(path) as tf:
        member = tf.getmembers()[member_index]
    with open(path, "r+b") as f:
        f.seek(member.offset)
        f.write(b"\xff" * 512)


def _corrupt_image(path: Path, sample_index: int) -> str:
    with tarfile.open(path) as tf:
        jpgs = [m for m in tf.getmembers() if m.name.endswith(".jpg")]
    member = jpgs[sample_index]
    with open(path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"not a jpeg at all" * 4)
    return member.name.split(".")[0]


def test_corrupt_shard_is_named_or_skipped_and_counted(synth_data, tmp_path):
    from neuclip.error_study.tracking import train
    from neuclip.train.data import DataError

    def copy(name: str) -> Path:
        shutil.copytree(synth_data / "train", tmp_path / name / "train")
        return tmp_path / name

    bad_header, bad_image, both = copy("bad_header"), copy("bad_image"), copy("both")
    for data in (bad_header, both):
        _corrupt_header(data / "train" / "00001.tar", 3 * 6)  # the header of sample 6's first member
    for data in (bad_image, both):
        bad_key = _corrupt_image(data / "train" / "00002.tar", 2)

    for data, named in (
        (bad_header, str(bad_header / "train" / "00001.tar")),
        (bad_image, f"{bad_image / 'train' / '00002.tar'} key {bad_key}"),
    ):
        cfg = tiny_config(tmp_path / f"strict_{data.name}", train_pattern(data), **{"train.max_steps": 6})
        with pytest.raises(DataError) as err:
            train(cfg)
        assert named in str(err.value) and "data.skip_bad" in str(err.value), str(err.value)
        assert not (Path(cfg["run_dir"]) / "done.json").exists()

    cfg = tiny_config(tmp_path / "skip", train_pattern(both), **{"train.max_steps": 6, "data.skip_bad": True})
    done = train(cfg)
    assert done["bad_shards"] == 1 and done["bad_samples"] == 1, done
    metrics = [json.loads(x) for x in (Path(cfg["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bad_shards"] == 1 and metrics[-1]["bad_samples"] == 1


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_step_boundary_and_exits_75(synth_data, tmp_path):
    """Without submitit: SIGTERM -> checkpoint of the step just finished -> exit 75; a rerun finishes."""
    from neuclip.error_study.tracking import train
    from neuclip.train.trainer import EXIT_PREEMPTED

    cfg = tiny_config(tmp_path / "run", train_pattern(synth_data),
                      **{"train.max_steps": 40, "train.checkpoint_every": 1000})
    run = Path(cfg["run_dir"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuclip.cli", "train", str(write_config(tmp_path / "c.yaml", cfg))],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "stopped by SIGTERM" in err and "rerun to resume" in err
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [last]  # no step lost
    assert train(cfg)["steps"] == 40


def test_checkpoint_comparison_is_bit_for_bit():
    """tensors_equal compares bit patterns: an unvisited id's NaN state equals itself, -0.0 is not 0.0."""
    state = torch.tensor([0.5, float("nan")])
    assert tensors_equal({"a1": state}, {"a1": state.clone()}) == []
    assert tensors_equal({"a1": state}, {"a1": torch.tensor([0.5, 1.0])}) == ["/a1"]
    assert tensors_equal(torch.tensor([0.0]), torch.tensor([-0.0])) == [""]
