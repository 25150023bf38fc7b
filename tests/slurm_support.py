"""The single-machine SLURM test cluster as a pytest fixture, shared by every test marked `slurm`.

Reuses a running cluster (`$NEUCLIP_SLURM_DIR/env.sh` exists and `sinfo` answers) and leaves it alone;
otherwise starts one with slurm/testcluster/start.sh and stops it at the end of the session. Without the
SLURM binaries the tests skip -- unless CI is set, where a missing SLURM is a failure, so a broken CI image
cannot pass by skipping. `two_nodes` is the partition of the cluster's two namespaced hosts (node1, node2);
under CI the cluster must have them (start.sh is run with NEUCLIP_SLURM_NETNS=1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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
    running = env_sh.exists() and _sinfo_answers(_read_env(env_sh))
    # A running cluster without the two-node partition (started by an older start.sh, or by hand without
    # namespaces) is brought up to date in CI: start.sh is idempotent and adds what is missing.
    upgrade = running and _in_ci() and not _read_env(env_sh).get("NEUCLIP_SLURM_TWO_NODE_PARTITION")
    if not running or upgrade:
        netns = {"NEUCLIP_SLURM_NETNS": "1"} if _in_ci() else {}
        r = subprocess.run(
            [str(TESTCLUSTER / "start.sh"), str(STATE_DIR)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PATH": SBIN_PATH, **netns},
        )
        if r.returncode != 0:
            # Do not leave a half-started cluster behind (start.sh stops at the first daemon that fails).
            if not running:
                subprocess.run([str(TESTCLUSTER / "stop.sh"), str(STATE_DIR)], capture_output=True, timeout=300)
            pytest.fail(f"slurm/testcluster/start.sh failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        started_here = not running

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


@pytest.fixture(scope="session")
def two_nodes(slurm_cluster) -> str:
    """The partition of the two namespaced hosts (node1, node2, each its own network namespace and hostname)."""
    partition = slurm_cluster.get("NEUCLIP_SLURM_TWO_NODE_PARTITION")
    if not partition:
        msg = "the test cluster has no two-node partition (network namespaces unavailable: see start.sh)"
        if _in_ci():
            pytest.fail(f"{msg}; CI requires it")
        pytest.skip(msg)
    return partition
