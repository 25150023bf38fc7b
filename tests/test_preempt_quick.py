"""Preemption lands in the middle of something long and still takes its checkpoint quickly (slurm/README.md,
"Preemption"): an error measurement is interruptible (the step's checkpoint is written before it, so SIGTERM
stops at once and the next attempt measures again), and a signal during a checkpoint write stops right after
the write, with no further step and no second write. Each run ends bit-identical to an uninterrupted one.

The long operation is made long on purpose in a child process (a sleep wrapped around the real one); the
signal is sent while the child is inside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import tensors_equal, tiny_config, train_pattern, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEP = 8  # where the signal lands

CHILD = """
import sys, time
from pathlib import Path
mode, cfg, marker, step = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
if mode == "measure":
    import neuclip.error_study.tracking as tracking
    real = tracking.ErrorTracker.__call__
    def slow(self, at, epoch, model):
        if at == step and not marker.exists():
            marker.write_text("in")
            time.sleep(300)  # a measurement far longer than any USR2 delay
        return real(self, at, epoch, model)
    tracking.ErrorTracker.__call__ = slow
else:
    from neuclip.train import resume
    real = resume.save
    def slow(ckpt_dir, at, *args, **kwargs):
        out = real(ckpt_dir, at, *args, **kwargs)
        if at == step and not marker.exists():
            marker.write_text("in")
            time.sleep(3)  # the write is still going on when the signal comes
        return out
    resume.save = slow
from neuclip.cli import main
sys.exit(main(["train", cfg]))
"""


def _interrupted_run(tmp_path: Path, cfg: dict, mode: str) -> tuple[float, str]:
    marker = tmp_path / f"{mode}.marker"
    path = write_config(tmp_path / f"{mode}.yaml", cfg)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(path), str(marker), str(STEP)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    sent = time.monotonic()
    proc.terminate()  # SIGTERM, as SLURM sends before a requeue
    err = proc.communicate(timeout=120)[1]
    return time.monotonic() - sent, f"exit {proc.returncode}\n{err}"


def _state(run: Path) -> dict:
    _, state = ckpt.load_latest(run / "checkpoints")
    return {k: state[k] for k in ("model", "optimizer", "estimator", "rng", "data")}


@pytest.mark.parametrize("mode", ["measure", "write"])
def test_a_signal_mid_operation_stops_quickly_and_loses_nothing(mode, synth_data, tmp_path):
    from neuclip.error_study.tracking import train
    from neuclip.train.trainer import EXIT_PREEMPTED

    torch.set_num_threads(1)
    pattern = train_pattern(synth_data)
    common = {"method.name": "fastclip", "train.max_steps": 12, "error.anchors": 16, "train.threads": 1}
    common.update({"error.every": 4} if mode == "measure" else {"train.checkpoint_every": 4})
    ref = tiny_config(tmp_path / "ref", pattern, **common)
    train(ref)
    cfg = tiny_config(tmp_path / mode, pattern, **common)
    took, log = _interrupted_run(tmp_path, cfg, mode)
    assert log.startswith(f"exit {EXIT_PREEMPTED}"), log[-3000:]
    assert took < 20, f"took {took:.1f}s to stop after SIGTERM\n{log[-2000:]}"
    run = Path(cfg["run_dir"])
    # the newest checkpoint is the step the signal landed in: no further step was taken, none was lost
    assert ckpt.list_checkpoints(run / "checkpoints")[-1][0] == STEP, log[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) <= STEP
    if mode == "measure":
        assert "stopping now" in log
        curve = [json.loads(line)["step"] for line in (run / "error_curve.jsonl").read_text().splitlines()]
        assert STEP not in curve  # it was cut short; the resume measures it
    train(cfg)  # the next attempt
    assert tensors_equal(_state(Path(ref["run_dir"])), _state(run)) == []
    if mode == "measure":
        ours = [json.loads(line) for line in (run / "error_curve.jsonl").read_text().splitlines()]
        theirs = [json.loads(line) for line in (Path(ref["run_dir"]) / "error_curve.jsonl").read_text().splitlines()]
        assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [4, 8, 12]
        for a, b in zip(ours, theirs):
            assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
