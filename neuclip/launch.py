"""Run a training job in this process or through submitit (local, debug or SLURM); thin on purpose.

The job is `TrainJob(cfg)`: calling it trains (resuming from the run folder's newest checkpoint), and its
`checkpoint()` hands submitit a *fresh* `TrainJob(cfg)` to requeue (dinov2's pattern): on timeout or
preemption the trainer first writes its own checkpoint, then submitit requeues, and the next attempt resumes.

The submitted job id goes to RUN/job.json. A rerun of the same config re-attaches to that SLURM job while it
is alive (checked with `scontrol show job`, which also confirms the job writes into our folder, since ids
restart on a fresh cluster) instead of submitting a second one. The exit status mirrors the job's, and a
failed job's remote traceback is printed.

Executors are built by class (`submitit.SlurmExecutor`, `LocalExecutor`, `DebugExecutor`): the explicit
form of `AutoExecutor(cluster=...)`, which would pick SLURM whenever `srun` is on PATH and cannot pass the
local executor's signal delay. Config values reach sbatch only as `#SBATCH` options that submitit
shell-quotes, after config validation has rejected control characters (a newline would start a new line).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ALIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
}


class TrainJob:
    """The submitted callable: train (or resume) `cfg`; checkpointable for submitit's requeue."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __call__(self) -> dict:
        import submitit

        from neuclip.train.trainer import Preempted, train

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK; each rank picks GPU local_rank itself.
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True
            )
        try:
            return train(self.cfg)
        except Preempted:
            if env.global_rank > 0:
                sys.exit(-1)  # like submitit's own handler: no result file, rank 0 requeues the job
            raise

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg))


def _job_name(cfg: dict) -> str:
    return "neuclip-" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(cfg["run_dir"]).name)[:60]


def make_executor(cfg: dict):
    """The submitit executor for `launcher.executor`, with the config's resources."""
    import submitit

    la = cfg["launcher"]
    kind = la["executor"]
    folder = Path(cfg["run_dir"]) / "submitit" / kind / "%j"
    gpus = la["gpus_per_node"] or 0
    tasks = la["tasks_per_node"] or max(1, gpus)
    max_timeouts = la["max_num_timeout"] if la["max_num_timeout"] is not None else 3
    if kind == "debug":
        return submitit.DebugExecutor(folder)
    if kind == "local":
        if la["nodes"] != 1:
            raise ValueError("launcher.nodes must be 1 with the local executor")
        ex = submitit.LocalExecutor(folder, max_num_timeout=max_timeouts)
        params = {
            "tasks_per_node": tasks,
            "gpus_per_node": gpus,
            "timeout_min": float(la["timeout_min"] or 60),
        }
        if la["signal_delay_s"] is not None:
            params["signal_delay_s"] = int(la["signal_delay_s"])
        ex.update_parameters(**params)
        return ex
    if kind == "slurm":
        ex = submitit.SlurmExecutor(folder, max_num_timeout=max_timeouts)
        params = {
            "job_name": _job_name(cfg),
            "nodes": la["nodes"],
            "ntasks_per_node": tasks,
            "time": int(math.ceil(la["timeout_min"] or 60)),
        }
        if gpus:
            params["gpus_per_node"] = f"{la['gpu_type']}:{gpus}" if la["gpu_type"] else gpus
        if la["cpus_per_task"]:
            params["cpus_per_task"] = la["cpus_per_task"]
        if la["mem_gb"]:
            mem = la["mem_gb"]
            params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
        for key in ("partition", "account", "qos"):
            if la[key]:
                params[key] = la[key]
        if la["signal_delay_s"] is not None:
            params["signal_delay_s"] = int(la["signal_delay_s"])
        if la["slurm_additional_parameters"]:
            params["additional_parameters"] = dict(la["slurm_additional_parameters"])
        ex.update_parameters(**params)
        return ex
    raise ValueError(f"launcher.executor {kind!r} is not a submitit executor")


def _write_job_record(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.json"
    tmp = path.with_name(f".job.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _scontrol_job(job_id: str) -> dict | None:
    """`scontrol show job -o ID` as a dict, or None if SLURM does not know the job (any more)."""
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    fields = {}
    for token in out.stdout.split():
        if "=" in token:
            key, value = token.split("=", 1)
            fields.setdefault(key, value)
    return fields


def alive_slurm_job(run_dir: Path):
    """The SLURM job recorded in RUN/job.json if it is still queued or running *for this run*, else None."""
    path = run_dir / "job.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("executor") != "slurm":
        return None
    job_id = str(record.get("job_id", ""))
    info = _scontrol_job(job_id)
    if not info:
        return None
    state = info.get("JobState", "").split("+")[0]
    folder = Path(record["folder"])
    stdout = info.get("StdOut", "")
    if state not in ALIVE_STATES or not stdout.startswith(str(folder.parent)):
        return None
    import submitit

    return submitit.SlurmJob(folder=folder, job_id=job_id)


def _local_job_alive(run_dir: Path) -> int | None:
    """The pid of a local-executor controller recorded in RUN/job.json that still runs, else None."""
    path = run_dir / "job.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("executor") != "local":
        return None
    try:
        pid = int(record["job_id"])
        for _ in range(20):  # a process that is still exec-ing shows an empty command line for a moment
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                return None  # exited, not yet reaped
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if cmdline:
                break
            time.sleep(0.05)
    except (KeyError, ValueError, IndexError, OSError):
        return None
    return pid if b"submitit" in cmdline else None


def submit(cfg: dict):
    """Submit (or re-attach to) the job for `cfg`; returns the submitit Job."""
    run_dir = Path(cfg["run_dir"])
    kind = cfg["launcher"]["executor"]
    if kind == "slurm":
        job = alive_slurm_job(run_dir)
        if job is not None:
            print(
                f"neuclip train: re-attaching to SLURM job {job.job_id} (still alive) for {run_dir}",
                file=sys.stderr,
                flush=True,
            )
            return job
    if kind == "local":
        pid = _local_job_alive(run_dir)
        if pid is not None:
            raise RuntimeError(
                f"a local submitit job (controller pid {pid}) is still running {run_dir}; wait for "
                "it or stop it first"
            )
    executor = make_executor(cfg)
    job = executor.submit(TrainJob(cfg))
    if kind != "debug":
        _write_job_record(
            run_dir,
            {
                "executor": kind,
                "job_id": str(job.job_id),
                "folder": str(executor.folder),
                "submitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "argv": sys.argv,
            },
        )
        print(
            f"neuclip train: submitted {kind} job {job.job_id}; logs in {job.paths.folder}",
            file=sys.stderr,
            flush=True,
        )
    return job


def wait(job) -> int:
    """Wait for `job`; 0 on success, 1 with the remote traceback on failure."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        done = job.result()
    except FailedJobError as err:
        print(f"neuclip train: job {job.job_id} failed:\n{err}", file=sys.stderr, flush=True)
        return 1
    except UncompletedJobError as err:
        print(
            f"neuclip train: job {job.job_id} ended without a result (killed, out of memory, node lost or "
            f"out of requeues):\n{err}\nlogs: {job.paths.stderr}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(json.dumps(done), flush=True)
    return 0


def launch(cfg: dict, *, detach: bool = False) -> int:
    """Run the resolved config `cfg` with its launcher; returns the exit status."""
    from neuclip.train.trainer import EXIT_PREEMPTED, Preempted, train

    run_dir = Path(cfg["run_dir"])
    if (run_dir / "done.json").exists():
        print(f"neuclip train: {run_dir} is already done (done.json); nothing to do", file=sys.stderr)
        return 0
    if cfg["launcher"]["executor"] == "inprocess":
        try:
            done = train(cfg)
        except Preempted:
            return EXIT_PREEMPTED
        print(json.dumps(done), flush=True)
        return 0
    if cfg["launcher"]["executor"] == "debug":
        detach = False  # the debug executor runs the job inside job.result()
    job = submit(cfg)
    if detach:
        print(job.job_id, flush=True)
        return 0
    return wait(job)
