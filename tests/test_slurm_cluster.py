"""Integration tests against the real single-machine SLURM test cluster (slurm/testcluster/).

The session fixture reuses a running cluster (the one `.ci/run` starts: `$NEUCLIP_SLURM_DIR/env.sh` exists
and `sinfo` answers) and leaves it alone; otherwise it starts one with start.sh and stops it afterwards.
Without the SLURM binaries the tests skip -- unless CI is set, where a missing SLURM is a failure, so a
broken CI image cannot pass by skipping. Run just these with `pytest -m slurm`: ≈15 s, or ≈21 s when the
fixture has to start (and then stop) the cluster.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.slurm_support import _logs_hint  # the slurm_cluster fixture comes from conftest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()} ({_logs_hint()})"
    return r.stdout


def _wait(cond, timeout: float, what: str, interval: float = 0.5):
    """Poll cond() until it returns something truthy; fail with `what` and where to look otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} ({_logs_hint()})")
        time.sleep(interval)


def _sacct_states(job_id: str) -> list[str]:
    """Every allocation record of job_id, oldest first; -D keeps the REQUEUED record of an earlier run."""
    out = _run("sacct", "-X", "-D", "-n", "-P", "-o", "State", "-j", job_id)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _squeue_state(job_id: str) -> str:
    return _run("squeue", "-h", "-j", job_id, "-o", "%T").strip()


def test_sbatch_job_completes_and_is_accounted(slurm_cluster, tmp_path):
    out = tmp_path / "hello.out"
    job_id = _run("sbatch", "--parsable", "-J", "neuclip-hello", "-o", str(out), "--wrap", "echo hello-slurm")
    job_id = job_id.strip().split(";")[0]
    # COMPLETED in sacct proves the whole chain: slurmctld -> slurmd -> slurmdbd -> MariaDB.
    _wait(lambda: _sacct_states(job_id)[-1:] == ["COMPLETED"], 30, f"job {job_id} COMPLETED in sacct")
    assert out.read_text().strip() == "hello-slurm"


def test_submitit_gpu_job_returns_result(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")

    # Defined inside the test so cloudpickle ships it by value: the job's interpreter cannot import this
    # test module (tests/ is not on its sys.path).
    def probe(a, b):

        return a + b, os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("SLURM_JOB_PARTITION")

    # A fresh folder per test run: job ids restart on a freshly created cluster (see ECOSYSTEM.md).
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        slurm_partition="debug",
        gpus_per_node=1,
        cpus_per_task=1,
        mem_gb=1,
        timeout_min=5,
        name="neuclip-submitit-test",
    )
    job = executor.submit(probe, 20, 22)
    _wait(job.done, 60, f"submitit job {job.job_id} to finish (see {tmp_path / 'submitit'})", interval=1)
    total, cuda_devices, partition = job.result()
    assert total == 42
    # One of the two fake GPUs (which one depends on what else runs), exported like on a real cluster.
    assert cuda_devices in ("0", "1"), f"CUDA_VISIBLE_DEVICES={cuda_devices!r}: the fake gpu gres was not applied"
    assert partition == "debug"
    # submitit's own state polling goes through sacct, i.e. the accounting database.
    _wait(
        lambda: job.watcher.get_state(job.job_id, mode="force") == "COMPLETED",
        30,
        f"submitit to read job {job.job_id} as COMPLETED",
    )


def test_scontrol_requeue_reruns_job(slurm_cluster, tmp_path):
    marker = tmp_path / "first-run-started"
    out = tmp_path / "requeue.out"
    # First run: leaves a marker and sleeps until we requeue it. Second run: sees the marker, finishes.
    script = f"if [ -e {marker} ]; then echo second-run; exit 0; fi; touch {marker}; echo first-run; sleep 300"
    job_id = (
        _run(
            "sbatch",
            "--parsable",
            "-J",
            "neuclip-requeue",
            "--requeue",
            "--open-mode=append",
            "-o",
            str(out),
            "--wrap",
            script,
        )
        .strip()
        .split(";")[0]
    )
    try:
        _wait(marker.exists, 30, f"job {job_id} to start running")
        _run("scontrol", "requeue", job_id)
        # Back in the queue; it may start again before we look, so PENDING or a second RUNNING both count.
        _wait(
            lambda: (
                _squeue_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING")
                and _sacct_states(job_id)[:1] == ["REQUEUED"]
            ),
            20,
            f"job {job_id} to be requeued",
        )
        # Requeued jobs wait cred_expire (10 s on the test cluster) before they may start again.
        _wait(lambda: _sacct_states(job_id)[-1:] == ["COMPLETED"], 45, f"requeued job {job_id} to complete")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    assert _sacct_states(job_id) == ["REQUEUED", "COMPLETED"]
    # The file also holds slurmstepd's "*** JOB n CANCELLED ... DUE TO JOB REQUEUE ***" line.
    runs = [w for w in out.read_text().split() if w.endswith("-run")]
    assert runs == ["first-run", "second-run"], out.read_text()
    assert "Restarts=1" in _run("scontrol", "show", "job", job_id)
