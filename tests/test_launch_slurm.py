"""The launcher on the real single-machine SLURM test cluster (slurm/testcluster/): submit, re-attach on a
rerun, preemption signal -> checkpoint -> `scontrol requeue` -> resume -> the uninterrupted result.

Uses a running cluster (`.ci/run` starts one; or `slurm/testcluster/start.sh`) and skips otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import last_logged_step, run_attempts, tensors_equal, tiny_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
STATE_DIR = Path(os.environ.get("NEUCLIP_SLURM_DIR", "/tmp/neuclip-slurm"))


@pytest.fixture(scope="module")
def slurm_env(slurm_cluster):
    return slurm_cluster


def test_slurm_job_reattaches_requeues_on_preemption_and_resumes(slurm_env, synth_data, tmp_path):
    from neuclip import launch
    from neuclip.train.trainer import train

    shards = str(synth_data / "train" / "{00000..00002}.tar")
    steps = 60
    extra = {"train.max_steps": steps, "train.checkpoint_every": 1000, "train.log_every": 2}
    cfg = tiny_config(
        tmp_path / "job",
        shards,
        **extra,
        **{
            "launcher.executor": "slurm",
            "launcher.site": str(REPO / "slurm" / "site.yaml"),
            "launcher.timeout_min": 10,
            "launcher.gpus_per_node": 0,
        },
    )
    run_dir = Path(cfg["run_dir"])
    job = launch.submit(cfg)
    again = launch.submit(cfg)  # a rerun while the job lives re-attaches instead of submitting a second one
    assert again.job_id == job.job_id
    assert json.loads((run_dir / "job.json").read_text())["job_id"] == job.job_id

    ref = tiny_config(tmp_path / "ref", shards, **extra)
    train(ref)  # the uninterrupted reference, meanwhile

    deadline = time.time() + 240
    while len(run_attempts(run_dir)) < 1 or last_logged_step(run_dir) < steps // 3:
        assert time.time() < deadline, "the SLURM job did not start training"
        assert not (run_dir / "done.json").exists(), "finished before it could be preempted"
        time.sleep(0.2)
    # What SLURM sends before a time limit or a preemption (--signal=USR2@...), to the job's tasks.
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True, timeout=30)
    assert launch.wait(again) == 0, f"see {job.paths.folder}"

    attempts = run_attempts(run_dir)
    assert len(attempts) >= 2 and attempts[-1]["resumed_from_step"] > 0, attempts
    assert all(a["slurm_job_id"] == str(job.job_id) for a in attempts)  # requeued, not resubmitted
    a = torch.load(ckpt.checkpoint_path(Path(ref["run_dir"]) / "checkpoints", steps), weights_only=True)
    b = torch.load(ckpt.checkpoint_path(run_dir / "checkpoints", steps), weights_only=True)
    for part in ("model", "estimator", "optimizer", "data"):
        assert tensors_equal(a[part], b[part]) == [], part
    deadline = time.time() + 60  # the result is written just before the task exits: let SLURM catch up
    while launch.alive_slurm_job(run_dir) is not None:  # finished: a rerun does not re-attach
        assert time.time() < deadline, "the finished job still looks alive to scontrol"
        time.sleep(0.5)
    assert launch.launch(cfg) == 0  # done.json: nothing is submitted
