"""Integration tests against the real single-machine SLURM test cluster (slurm/testcluster/).

The session fixture reuses a running cluster (the one `.ci/run` starts: `$NEUCLIP_SLURM_DIR/env.sh` exists
and `sinfo` answers) and leaves it alone; otherwise it starts one with start.sh and stops it afterwards.
Without the SLURM binaries the tests skip -- unless CI is set, where a missing SLURM is a failure, so a
broken CI image cannot pass by skipping. Run just these with `pytest -m slurm`: ≈15 s, or ≈21 s when the
fixture has to start (and then stop) the cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TESTCLUSTER = REPO / "slurm" / "testcluster"
STATE_DIR = Path(os.environ.get("NEUCLIP_SLURM_DIR", "/tmp/neuclip-slurm"))
CLIENTS = ("sinfo", "sbatch", "sacct", "scontrol", "squeue", "scancel")
# Daemons live in /usr/sbin, which a non-root PATH often lacks; only needed when we start the cluster.
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _read_env(env_sh: Path) -> dict[str, str]:
    """The variables env.sh exports (sourced by bash, so quoting in the file is handled by bash itself)."""
    out = subprocess.run(
        ["bash", "-c", 'set -a; source "$1"; env -0', "_", str(env_sh)],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    pairs = (item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: v for k, v in pairs if k == "SLURM_CONF" or k.startswith("NEUCLIP_")}


def _ctld_pid_alive() -> bool:
    """Cheap pre-check: with slurmctld down, sinfo spends ~9 s retrying before it gives up."""
    try:
        pid = int((STATE_DIR / "run" / "slurmctld.pid").read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return False
    return "slurmctld" in stat and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _sinfo_answers(env: dict[str, str]) -> bool:
    if not _ctld_pid_alive():
        return False
    try:
        r = subprocess.run(["sinfo", "-h"], env={**os.environ, **env}, capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def _logs_hint() -> str:
    return f"daemon logs: {STATE_DIR}/log/"


@pytest.fixture(scope="session")
def slurm_cluster():
    """Environment (SLURM_CONF, ...) of a running test cluster; also applied to os.environ for submitit."""
    missing = [b for b in CLIENTS if shutil.which(b) is None]
    missing += [b for b in DAEMONS if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        msg = f"SLURM test cluster needs {', '.join(missing)} on PATH: run .ci/install_debs.sh"
        if _in_ci():
            pytest.fail(f"{msg} (CI is set, so a missing SLURM is an error, not a skip)")
        pytest.skip(msg)

    env_sh = STATE_DIR / "env.sh"
    started_here = False
    if not (env_sh.exists() and _sinfo_answers(_read_env(env_sh))):
        r = subprocess.run(
            [str(TESTCLUSTER / "start.sh"), str(STATE_DIR)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PATH": SBIN_PATH},
        )
        if r.returncode != 0:
            # Do not leave a half-started cluster behind (start.sh stops at the first daemon that fails).
            subprocess.run([str(TESTCLUSTER / "stop.sh"), str(STATE_DIR)], capture_output=True, timeout=300)
            pytest.fail(f"slurm/testcluster/start.sh failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        started_here = True

    env = _read_env(env_sh)
    try:
        # submitit calls sbatch/sacct with os.environ, so SLURM_CONF must be there, not just in our dict.
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            yield env
    finally:
        if started_here:
            subprocess.run([str(TESTCLUSTER / "stop.sh"), str(STATE_DIR)], capture_output=True, timeout=300)


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
        import os

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
