"""Run a training job in this process or through submitit (local, debug or SLURM), and wait for it.

The job is `TrainJob(cfg)`: calling it trains (resuming from the run folder's newest checkpoint), and its
`checkpoint()` hands submitit a *fresh* `TrainJob(cfg)` to requeue (dinov2's pattern): on timeout or
preemption the trainer first writes its own checkpoint, then submitit requeues, and the next attempt resumes.

Before submitting, `launch` reads the run folder (neuclip/jobs.py), not only done.json:
- a job recorded in RUN/job.json that is still alive is re-attached to instead of submitting a second one;
- a run whose newest checkpoint is its final step has finished training: it is exported and done.json
  written here, in this process, with no job. That is what a forced rerun of a finished cell, or Snakemake's
  rerun-incomplete after it deleted done.json, comes to.
Then it waits (neuclip/waiter.py): through requeues to the job's final state, and no longer than the
process that started it lives. SLURM jobs are named after their grid cell (`jobs.job_name`).

Executors are built by class (`submitit.SlurmExecutor`, `LocalExecutor`, `DebugExecutor`): the explicit
form of `AutoExecutor(cluster=...)`, which would pick SLURM whenever `srun` is on PATH and cannot pass the
local executor's signal delay. Config values reach sbatch only as `#SBATCH` options that submitit
shell-quotes, after config validation has rejected control characters (a newline would start a new line).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import sys
from pathlib import Path

from neuclip.jobs import final_checkpoint, job_name, live_job, write_job_record
from neuclip.waiter import wait

__all__ = ["TrainJob", "launch", "make_executor", "submit", "wait"]


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
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        try:
            return train(self.cfg)
        except Preempted:
            if env.global_rank > 0:
                sys.exit(-1)  # like submitit's own handler: no result file, rank 0 requeues the job
            raise

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg))


# -- executors --------------------------------------------------------------------------------------------


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
            "job_name": job_name(cfg),
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


# -- submitting, finishing, waiting -----------------------------------------------------------------------


def _reattached(job, run_dir: Path):
    print(f"neuclip train: re-attaching to job {job.job_id} (still alive) for {run_dir}", file=sys.stderr, flush=True)
    return job


def submit(cfg: dict):
    """Re-attach to the run's live job, or submit a new one; returns the submitit Job."""
    job = live_job(cfg) if cfg["launcher"]["executor"] != "debug" else None
    return _reattached(job, Path(cfg["run_dir"])) if job is not None else _submit_new(cfg)


def _submit_new(cfg: dict):
    run_dir = Path(cfg["run_dir"])
    kind = cfg["launcher"]["executor"]
    executor = make_executor(cfg)
    job = executor.submit(TrainJob(cfg))
    if kind != "debug":
        name = job_name(cfg)
        write_job_record(
            run_dir,
            {
                "executor": kind,
                "job_id": str(job.job_id),
                "job_name": name,
                "folder": str(executor.folder),
                "submitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "argv": sys.argv,
            },
        )
        print(
            f"neuclip train: submitted {kind} job {job.job_id} ({name}); logs in {job.paths.folder}",
            file=sys.stderr,
            flush=True,
        )
    return job


def _finish_here(cfg: dict) -> int | None:
    """If training is complete (final checkpoint), export the run in this process and return 0, else None.

    The trainer does it: it resumes at the final step, takes no step, exports and writes done.json.
    """
    final = final_checkpoint(cfg)
    if final is None:
        return None
    run_dir = Path(cfg["run_dir"])  # any world size and worker count resume the data order (train/data.py)
    print(
        f"neuclip train: {run_dir} finished training ({final['path'].name} is the final step); exporting it "
        "here, without submitting a job",
        file=sys.stderr,
        flush=True,
    )
    import torch

    from neuclip.train.trainer import train

    local = copy.deepcopy(cfg)
    if local["train"]["device"] == "cuda" and not torch.cuda.is_available():
        local["train"]["device"] = "cpu"  # no step is taken: the export does not need the GPU
    print(json.dumps(train(local)), flush=True)
    return 0


def launch(cfg: dict, *, detach: bool = False) -> int:
    """Run the resolved config `cfg` with its launcher; returns the exit status."""
    from neuclip.train.trainer import EXIT_PREEMPTED, Preempted, train

    run_dir = Path(cfg["run_dir"])
    if (run_dir / "done.json").exists():
        print(f"neuclip train: {run_dir} is already done (done.json); nothing to do", file=sys.stderr)
        return 0
    kind = cfg["launcher"]["executor"]
    if kind == "inprocess":
        try:
            done = train(cfg)
        except Preempted:
            return EXIT_PREEMPTED
        print(json.dumps(done), flush=True)
        return 0
    if kind == "debug":
        return wait(_submit_new(cfg))  # the debug executor runs the job inside job.result()
    job = live_job(cfg)
    if job is not None:
        job = _reattached(job, run_dir)
    else:
        status = _finish_here(cfg)
        if status is not None:
            return status
        job = _submit_new(cfg)
    if detach:
        print(job.job_id, flush=True)
        return 0
    return wait(job, run_dir)
