"""The trainer with sharded per-sample state and a BatchNorm model under DDP (2 gloo processes, torchrun).

One run of tiny-cnn (ModifiedResNet with BatchNorm, RN50's family) with FastCLIP's state sharded by sample id is
SIGKILLed at a random step and rerun; the uninterrupted twin is the reference. After the last step:
- the main checkpoint and each rank's state shard are bit-identical to the reference's;
- each rank's own parameters *and BatchNorm buffers* (dumped by every rank: the checkpoint holds rank 0's) are
  bit-identical to the reference's, and the same on both ranks (train.batchnorm: broadcast);
- each main file holds no per-sample array, each shard half of them;
- one process resumes the 2-rank shards (re-cut for world 1) into exactly the assembled arrays;
- `neuclip error run` on 2 processes (each its own state shard and half the data) gives the one-process row.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import RANK_DUMPS, tensors_equal, tiny_config, train_pattern, write_config

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
STEPS, DATA_SIZE = 14, 1001  # 48 ids in 0..215 (img2dataset keys); state for 1001 ids (odd: shards differ in size)


def torchrun(config: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
         "neuclip.train.testing", str(config)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )


def descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (torchrun starts each rank in its own session: killpg misses them)."""
    out = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in map(int, children):
        out += [child, *descendants(child)]
    return out


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]


def config(tmp_path: Path, name: str, synth_data: Path) -> Path:
    cfg = tiny_config(
        tmp_path / name, train_pattern(synth_data),
        **{"model": "tiny-cnn", "method.name": "fastclip", "method.options": {"state_placement": "sharded"},
           "data.data_size": DATA_SIZE, "train.max_steps": STEPS, "train.checkpoint_every": 3,
           "train.warmup_steps": 0, "data.workers": 1},
    )
    return write_config(tmp_path / f"{name}.yaml", cfg)


def bits(state: dict) -> dict:
    """Float tensors as their bit patterns, so that NaN (a never-visited id) equals NaN in tensors_equal."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return {k: v.view(ints[v.element_size()]) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in state.items()}


def rank_state(run: Path, step: int, rank: int) -> dict:
    return torch.load(run / RANK_DUMPS / f"step_{step}.rank{rank}.pt", weights_only=True)


@pytest.mark.slow
def test_sharded_state_and_batchnorm_resume_bit_exact_on_both_ranks(synth_data, tmp_path):
    ref = torchrun(config(tmp_path, "ref", synth_data))
    finish(ref)

    run = tmp_path / "run"
    proc = torchrun(config(tmp_path, "run", synth_data))
    kill_after = random.Random().randint(4, 8)  # after the step-3 checkpoint, well before the last
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both ranks, as a lost node
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    assert not (run / "done.json").exists()
    assert list((run / "checkpoints").glob("step_000000003.rank0000*-of-00002.pt"))
    finish(torchrun(tmp_path / "run.yaml"))

    a_dir, b_dir = tmp_path / "ref" / "checkpoints", run / "checkpoints"
    a, b = (torch.load(ckpt.checkpoint_path(d, STEPS), weights_only=True) for d in (a_dir, b_dir))
    for part in ("model", "optimizer", "estimator", "rng", "data"):
        assert tensors_equal(a[part], b[part]) == [], part
    assert repr(a["estimator_shards"]) == repr(b["estimator_shards"]) == repr(
        {"world": 2, "data_size": DATA_SIZE, "fills": {"a1": float("nan"), "a2": float("nan")}})
    assert "a1" not in a["estimator"] and "a2" not in a["estimator"]
    shards = []
    for rank in range(2):
        sa, sb = (ckpt.load_shard(d, STEPS, rank, 2) for d in (a_dir, b_dir))
        assert sa.keys() == sb.keys() and sa["estimator"].keys() == sb["estimator"].keys() == {"a1", "a2"}
        assert tensors_equal(bits(sa["estimator"]), bits(sb["estimator"])) == [], f"rank {rank} shard"
        assert (sa["rank"], sa["world"], sa["data_size"]) == (rank, 2, DATA_SIZE)
        assert sa["estimator"]["a1"].numel() == len(range(rank, DATA_SIZE, 2))
        shards.append(sa["estimator"])

    ranks = [[rank_state(r, STEPS, k) for k in range(2)] for r in (tmp_path / "ref", run)]
    for k in range(2):
        for part in ("model", "estimator"):
            assert tensors_equal(bits(ranks[0][k][part]), bits(ranks[1][k][part])) == [], f"rank {k}: {part}"
    bn = [key for key in ranks[0][0]["model"] if "running_" in key or "num_batches" in key]
    assert bn, "tiny-cnn has BatchNorm buffers"
    assert tensors_equal(ranks[1][0]["model"], ranks[1][1]["model"]) == []  # the same on both ranks
    assert tensors_equal({k: ranks[1][0]["model"][k] for k in bn}, {k: b["model"][k] for k in bn}) == []

    # one process reads the 2-rank checkpoint: the shards re-cut into one array
    from neuclip.estimators import EstimatorContext, build_estimator
    from neuclip.train.resume import estimator_state

    est = build_estimator("fastclip", {"state_placement": "sharded"}, EstimatorContext(embed_dim=32,
                                                                                       data_size=DATA_SIZE))
    est.load_state_dict(estimator_state(ckpt.checkpoint_path(b_dir, STEPS), b, est))
    for key in ("a1", "a2"):
        whole = torch.empty(DATA_SIZE)
        whole[0::2], whole[1::2] = shards[0][key], shards[1][key]
        assert torch.equal(getattr(est, key).isnan(), whole.isnan())
        assert torch.equal(getattr(est, key).nan_to_num(), whole.nan_to_num())
        assert int((~whole.isnan()).sum()) == 48  # every sample of the shards visited, no other id

    # `neuclip error run`: one process (shards re-cut) and two (each rank its own shard) give the same row
    import json

    from neuclip.error_study.run_error import score_run

    one = score_run(run, anchors=20)
    assert one["coverage"] == 1.0 and one["n"] == 48
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "neuclip.cli",
         "error", "run", str(run), "--anchors", "20"], cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    two = json.loads((run / "error" / "error.json").read_text())
    for key, value in one.items():
        if isinstance(value, float) and key != "seconds":
            assert two[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_syncbatchnorm_on_cpu_is_refused_naming_the_key():
    from neuclip.train.config import ConfigError
    from neuclip.train.runtime import Process
    from neuclip.train.setup import wrap_ddp

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="train.batchnorm: sync needs CUDA"):
        wrap_ddp(model, Process(0, 2, torch.device("cpu")), "sync")

