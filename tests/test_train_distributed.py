"""Two gloo processes (torchrun) on the same global batches as one process: same losses and parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import tiny_config, train_pattern, write_config

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _param_diff(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.float() - b.float()).abs()
    if name.endswith("attn.in_proj_bias"):
        # The key bias has exactly zero gradient (softmax is shift invariant): its "gradient" is rounding
        # noise, which Adam's normalisation turns into steps of up to lr * noise / eps. Compare q and v only.
        width = diff.numel() // 3
        diff = torch.cat([diff[:width], diff[2 * width :]])
    return diff.max().item()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(synth_data, tmp_path):
    from neuclip.error_study.tracking import train

    shards = train_pattern(synth_data)
    steps = 4
    # error tracking on as well: rank 0 measures while rank 1 waits, with 2 vs 1 embedding workers
    extra = {"train.max_steps": steps, "train.checkpoint_every": 100, "train.warmup_steps": 0, "error.every": 2}
    # The data order depends on the global batch alone: 1 process x 2 workers and 2 processes x 1 worker see the
    # same global batches in the same order.
    one = tiny_config(tmp_path / "one", shards, **extra, **{"data.workers": 2})
    two = tiny_config(tmp_path / "two", shards, **extra, **{"data.workers": 1})
    config = write_config(tmp_path / "two.yaml", two)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "neuclip.cli",
            "train",
            str(config),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    train(one)  # meanwhile
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]

    def metrics(cfg):
        return [json.loads(x) for x in (Path(cfg["run_dir"]) / "metrics.jsonl").read_text().splitlines()]

    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == list(range(1, steps + 1))
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["tau"] == pytest.approx(a["tau"], rel=1e-5)
    s1 = torch.load(ckpt.checkpoint_path(Path(one["run_dir"]) / "checkpoints", steps), weights_only=True)
    s2 = torch.load(ckpt.checkpoint_path(Path(two["run_dir"]) / "checkpoints", steps), weights_only=True)
    assert s2["world_size"] == 2 and len(s2["rng"]) == 2
    worst = max(_param_diff(k, s1["model"][k], s2["model"][k]) for k in s1["model"])
    assert worst < 1e-5, worst
    for k in s1["estimator"]:
        torch.testing.assert_close(s2["estimator"][k], s1["estimator"][k], rtol=1e-5, atol=1e-5)
    assert s1["data"] == s2["data"]  # the same data position (format 2: next step, order, counts)
    c1, c2 = (
        [json.loads(x) for x in (Path(c["run_dir"]) / "error_curve.jsonl").read_text().splitlines()] for c in (one, two)
    )
    assert [r["step"] for r in c1] == [r["step"] for r in c2] == [2, 4]  # written once, by rank 0
    for a, b in zip(c1, c2):
        assert b["n"] == a["n"] == 48 and b["mse_log"] == pytest.approx(a["mse_log"], rel=1e-4, abs=1e-6)
