"""Run a job of any kind (train, eval, error-run, error-sweep) in this process or through submitit (local, debug
or SLURM), and wait for it.

A job is `Job(kind, cfg)`: `cfg` holds the job folder (`run_dir`), the `launcher` section (the one table of
resource knobs, neuclip/grid/launcher.yaml; `launch` completes a partial one) and `meta` labels; a train job's
cfg is the whole train config, another kind's carries its command's arguments under `args`. Calling the job
does the work; its `checkpoint()` hands submitit a *fresh* `Job(kind, cfg)` to requeue (dinov2's pattern). On timeout or
preemption the work resumes from what it left on disk: the trainer from its own checkpoint (it writes one
first), an evaluation from its finished task files (the runner skips every task whose result matches the
model and task fingerprints), the error pass and the sweep by recomputing (each is a function of its
inputs). With several tasks (`nodes` x `tasks_per_node`), torch.distributed's environment is exported
(`TorchDistributedEnvironment`: MASTER_ADDR is the first node, RANK, WORLD_SIZE, LOCAL_RANK).

Before submitting, `launch` reads the job folder (neuclip/jobs/records.py), not only the output file:
- a job recorded in JOB_DIR/job.json that is still alive is re-attached to instead of submitting a second one;
- a train run whose newest checkpoint is its final step has finished training: it is exported and done.json
  written here, in this process, with no job. That is what a forced rerun of a finished cell, or Snakemake's
  rerun-incomplete after it deleted done.json, comes to;
- with `supersede` (the workflow's train rule), a run folder holding a run of *another* identity (a changed
  method option, seed, step budget, ...) is moved aside, to EXPERIMENT.superseded/STAMP/..., and the cell
  trains afresh; without it that is an error, as before;
- another kind's job whose last job in that folder already did the same work (job.json's `work` key) is not
  submitted again: its output is restored from that job's result if a rerun removed it (neuclip/jobs/stages.py).
Then it waits (neuclip/jobs/waiter.py): through requeues to the job's final state, and no longer than the
process that started it lives. SLURM jobs are named after their grid cell and stage (`jobs.job_name`).

Executors are built by class (`submitit.SlurmExecutor`, `LocalExecutor`, `DebugExecutor`): the explicit
form of `AutoExecutor(cluster=...)`, which would pick SLURM whenever `srun` is on PATH and cannot pass the
local executor's signal delay. Config values reach sbatch only as `#SBATCH` options that submitit
shell-quotes, after config validation has rejected control characters (a newline would start a new line).
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib
import json
import math
import sys
import time
from pathlib import Path

from neuclip.grid.launcher import LAUNCHER, launcher_section, resolve_launcher, tasks_per_node
from neuclip.jobs import stages
from neuclip.jobs.records import KINDS, final_checkpoint, job_name, live_job, record_attempt, write_job_record
from neuclip.jobs.waiter import wait
from neuclip.train.config import ConfigError, identity_diff
from neuclip.yamlio import yaml_load

__all__ = ["KINDS", "Job", "TrainJob", "launch", "make_executor", "submit", "wait"]


def _call(kind: str, cfg: dict):
    module, function = KINDS[kind].run.split(":")
    return getattr(importlib.import_module(module), function)(cfg)


class Job:
    """The submitted callable: do `kind`'s work for `cfg`; checkpointable for submitit's requeue."""

    def __init__(self, kind: str, cfg: dict):
        self.kind, self.cfg = kind, cfg

    def __call__(self):
        import submitit

        from neuclip.train.trainer import Preempted

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK; each rank picks GPU local_rank itself.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.kind != "train":  # the trainer records its attempts in RUN/provenance.json itself
            record_attempt(Path(self.cfg["run_dir"]), env.global_rank)
        try:
            return _call(self.kind, self.cfg)
        except Preempted:
            if env.global_rank > 0:
                sys.exit(-1)  # like submitit's own handler: no result file, rank 0 requeues the job
            raise

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(Job(self.kind, self.cfg))


class TrainJob(Job):
    def __init__(self, cfg: dict):
        super().__init__("train", cfg)


def slurm_parameters(cfg: dict) -> dict:
    """SlurmExecutor parameters from the launcher section: each key marked `x-slurm` in the schema passes
    as is; the rest are shaped here (GPUs with their type, memory, time limit, tasks, the job name)."""
    la = cfg["launcher"]
    params = {name["x-slurm"]: la[key] for key, name in LAUNCHER.items() if "x-slurm" in name and la[key] is not None}
    params.update(job_name=job_name(cfg), ntasks_per_node=tasks_per_node(la),
                  time=int(math.ceil(la["timeout_min"] or 60)))
    gpus = la["gpus_per_node"] or 0
    if gpus:
        params["gpus_per_node"] = f"{la['gpu_type']}:{gpus}" if la["gpu_type"] else gpus
    if la["mem_gb"]:
        mem = la["mem_gb"]
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    if la["slurm_additional_parameters"]:
        params["additional_parameters"] = dict(la["slurm_additional_parameters"])
    return params


def make_executor(cfg: dict, kind: str = "train"):
    """The submitit executor for `launcher.executor`, with the config's resources."""
    import submitit


    la = cfg["launcher"]
    executor = la["executor"]
    folder = Path(cfg["run_dir"]) / "submitit" / executor / "%j"
    if not KINDS[kind].distributed and la["nodes"] * tasks_per_node(la) > 1:
        raise ConfigError(
            f"{KINDS[kind].command} runs as one task, but its launcher asks for {la['nodes']} node(s) x "
            f"{tasks_per_node(la)} task(s): set tasks_per_node: 1 and nodes: 1 for this stage"
        )
    max_timeouts = la["max_num_timeout"] if la["max_num_timeout"] is not None else 3
    if executor == "debug":
        return submitit.DebugExecutor(folder)
    if executor == "local":
        if la["nodes"] != 1:
            raise ConfigError("launcher.nodes must be 1 with the local executor")
        ex = submitit.LocalExecutor(folder, max_num_timeout=max_timeouts)
        params = {
            "tasks_per_node": tasks_per_node(la),
            "gpus_per_node": la["gpus_per_node"] or 0,
            "timeout_min": float(la["timeout_min"] or 60),
        }
        if la["signal_delay_s"] is not None:
            params["signal_delay_s"] = int(la["signal_delay_s"])
        ex.update_parameters(**params)
        return ex
    if executor == "slurm":
        ex = submitit.SlurmExecutor(folder, max_num_timeout=max_timeouts)
        ex.update_parameters(**slurm_parameters(cfg))
        return ex
    raise ConfigError(f"launcher.executor {executor!r} is not a submitit executor")


# -- submitting, finishing, waiting -----------------------------------------------------------------------


def _reattached(job, run_dir: Path, kind: str = "train"):
    print(
        f"{KINDS[kind].command}: re-attaching to job {job.job_id} (still alive) for {run_dir}",
        file=sys.stderr,
        flush=True,
    )
    return job


def submit(cfg: dict, kind: str = "train"):
    """Re-attach to the job folder's live job, or submit a new one; returns the submitit Job."""
    cfg = resolve_launcher(cfg)
    job = live_job(cfg) if cfg["launcher"]["executor"] != "debug" else None
    return _reattached(job, Path(cfg["run_dir"]), kind) if job is not None else _submit_new(cfg, kind)


def _submit_new(cfg: dict, kind: str = "train"):
    run_dir = Path(cfg["run_dir"])
    executor = cfg["launcher"]["executor"]
    ex = make_executor(cfg, kind)
    work = stages.work_key(kind, cfg)  # the inputs as the job will read them: stamped before it can start
    job = _submit_retrying(ex, Job(kind, cfg), cfg) if executor == "slurm" else ex.submit(Job(kind, cfg))
    if executor != "debug":
        name = job_name(cfg)
        write_job_record(
            run_dir,
            {
                "kind": kind,
                "work": work,  # what this job computes: a finished one is reused for the same work
                "executor": executor,
                "job_id": str(job.job_id),
                "job_name": name,
                "folder": str(ex.folder),
                "submitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "argv": sys.argv,
            },
        )
        print(
            f"{KINDS[kind].command}: submitted {executor} job {job.job_id} ({name}); logs in {job.paths.folder}",
            file=sys.stderr,
            flush=True,
        )
    return job


# sbatch's words when the controller cannot be reached (a restart, a fail-over): worth another try
TRANSIENT_SBATCH = ("unable to contact slurm controller", "socket timed out", "temporarily unable",
                    "connection refused", "zero bytes were transmitted")


class SubmissionFailed(RuntimeError):
    """sbatch failed: not transient, or still failing after launcher.submit_retry_s."""


def _submit_retrying(ex, job, cfg: dict, sleep=time.sleep):
    """ex.submit, retried with backoff (5 s doubling to 60 s) for up to launcher.submit_retry_s (300 s) while sbatch
    cannot reach the controller; each try is logged. A controller restart no longer costs a manual rerun."""
    import submitit.core.utils

    limit = cfg["launcher"]["submit_retry_s"]
    limit = 300.0 if limit is None else float(limit)
    started, wait, tries = time.monotonic(), 5.0, 0
    while True:
        tries += 1
        try:
            return ex.submit(job)
        except submitit.core.utils.FailedJobError as err:
            message = " ".join(str(err).split())
            transient = any(t in message.lower() for t in TRANSIENT_SBATCH)
            waited = time.monotonic() - started
            if not transient or waited + wait > limit:
                why = "" if transient else " (not a controller outage, so not retried)"
                raise SubmissionFailed(
                    f"sbatch failed after {tries} tr{'y' if tries == 1 else 'ies'} over {waited:.0f} s{why}: "
                    f"{message}; check `sinfo` / `scontrol ping`, then rerun (finished stages are reused)"
                ) from err
            print(f"{KINDS[job.kind].command}: sbatch could not reach the controller (try {tries}: {message}); "
                  f"retrying in {wait:.0f} s (launcher.submit_retry_s = {limit:.0f})", file=sys.stderr, flush=True)
            sleep(wait)
            wait = min(60.0, 2 * wait)


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

    from neuclip.error_study.tracking import train

    local = copy.deepcopy(cfg)
    if local["train"]["device"] == "cuda" and not torch.cuda.is_available():
        local["train"]["device"] = "cpu"  # no step is taken: the export does not need the GPU
    print(json.dumps(train(local)), flush=True)
    return 0


def superseded_path(cfg: dict, stamp: str) -> Path:
    """Where a run folder of another identity goes: EXPERIMENT.superseded/STAMP/<its place in the grid> beside
    the experiment's runs (outside them, so the report and status never read it), or a sibling
    NAME.superseded-STAMP for a run started by hand."""
    run_dir = Path(cfg["run_dir"])
    meta = cfg.get("meta") or {}
    cell = [str(meta.get(k)) for k in ("dataset", "method", "variant")] + [f"seed{meta.get('seed')}"]
    if len(run_dir.parts) > 5 and list(run_dir.parts[-4:]) == cell:
        root = run_dir.parents[3]
        return root.parent / f"{root.name}.superseded" / stamp / Path(*cell)
    return run_dir.parent / f"{run_dir.name}.superseded-{stamp}"


def supersede_stale(cfg: dict) -> Path | None:
    """Move the run folder aside if it holds a run of another identity (its config.yaml differs on an identity
    key); returns where it went. Refused while that run's job is alive."""
    run_dir = Path(cfg["run_dir"])
    try:
        old = yaml_load((run_dir / "config.yaml").read_text())
        diff = identity_diff(old, cfg)
    except OSError:
        return None
    except (KeyError, TypeError, ValueError):
        diff = ["(unreadable config.yaml)"]
    if not diff:
        return None
    job = live_job(cfg)
    if job is not None:
        raise ConfigError(
            f"{run_dir} holds a run of another config ({'; '.join(diff)}) whose job {job.job_id} is still alive: "
            "cancel it (scancel) or let it finish, then rerun"
        )
    dest = superseded_path(cfg, dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(dest)
    print(
        f"neuclip train: {run_dir} held a run of another config ({'; '.join(diff)}); moved it to {dest} and "
        "starting afresh",
        file=sys.stderr,
        flush=True,
    )
    return dest


def launch(cfg: dict, *, kind: str = "train", detach: bool = False, supersede: bool = False) -> int:
    """Run the resolved config `cfg` of job `kind` with its launcher; returns the exit status. A partial launcher
    section is completed first (defaults < launcher.site < its own values), so the job, and the run folder's
    config.yaml, always hold the whole section."""
    from neuclip.train.trainer import EXIT_PREEMPTED, Preempted

    cfg = resolve_launcher(cfg)
    run_dir = Path(cfg["run_dir"])
    command = KINDS[kind].command
    if kind == "train":
        if supersede:
            supersede_stale(cfg)
        if (run_dir / "done.json").exists():
            print(f"{command}: {run_dir} is already done (done.json); nothing to do", file=sys.stderr)
            return 0
    executor = cfg["launcher"]["executor"]
    if executor == "inprocess":
        try:
            result = _call(kind, cfg)
        except Preempted:
            return EXIT_PREEMPTED
        print(json.dumps(result), flush=True)
        return 0
    if executor == "debug":
        return wait(_submit_new(cfg, kind), label=command)  # the debug executor runs the job in job.result()
    job = live_job(cfg)
    if job is not None:
        job = _reattached(job, run_dir, kind)
    else:
        status = _finish_here(cfg) if kind == "train" else stages.reuse_finished(kind, cfg)
        if status is not None:
            return status
        job = _submit_new(cfg, kind)
    if detach:
        print(job.job_id, flush=True)
        return 0
    status = wait(job, run_dir, label=command)
    return stages.restore_output(kind, cfg, job) if status == 0 and kind != "train" else status


# -- the stage commands' side: `neuclip eval|error run|error sweep --launcher YAML` -------------------------


def add_arguments(parser) -> None:
    """--launcher and --detach for a stage command."""
    parser.add_argument(
        "--launcher",
        metavar="YAML",
        default=None,
        help="run as a job with this launcher section (neuclip/grid/launcher.yaml's keys: executor, site, nodes, "
        "gpus_per_node, timeout_min, ...), as a YAML mapping or a file holding one, e.g. "
        "'{executor: slurm, site: slurm/site.yaml, gpus_per_node: 1}'; default: in this process",
    )
    parser.add_argument(
        "--detach", action="store_true", help="with --launcher: submit and return without waiting (prints the job id)"
    )


def parse_launcher(text: str) -> dict:
    """A --launcher value (YAML mapping, or a YAML file) as a complete, validated launcher section."""
    path = Path(text)
    source = path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text
    given = yaml_load(source)
    if not isinstance(given, dict):
        raise ConfigError(f"--launcher must be a YAML mapping (or a file holding one), got {text!r}")
    return launcher_section(given, where="--launcher")


def run_meta(run_dir: Path) -> dict:
    """The labels of a train run (its config.yaml's meta), for naming its stage jobs after its cell."""
    try:
        return dict(yaml_load((Path(run_dir) / "config.yaml").read_text()).get("meta") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def launch_stage(kind: str, job_dir, args: dict, launcher: str, *, meta: dict, detach: bool = False) -> int:
    """Run a stage command's work (`args`) as a `kind` job in `job_dir` with the --launcher value given."""
    try:
        la = parse_launcher(launcher)
    except (ConfigError, OSError) as err:
        print(f"{KINDS[kind].command}: launcher error: {err}", file=sys.stderr)
        return 2
    cfg = {"run_dir": str(Path(job_dir).resolve()), "launcher": la, "meta": meta, "args": args}
    Path(cfg["run_dir"]).mkdir(parents=True, exist_ok=True)
    try:
        return launch(cfg, kind=kind, detach=detach)
    except ConfigError as err:
        print(f"{KINDS[kind].command}: error: {err}", file=sys.stderr)
        return 2
