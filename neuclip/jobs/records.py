"""What the job folder and the scheduler say about a job of any kind (train, eval, error-run, error-sweep): its
name, JOB_DIR/job.json, whether it is still alive, its attempts, and whether training is already complete.

The job folder is the train run folder, or a stage's output folder (RUN/eval/SUITE, RUN/error, the sweep's
folder). JOB_DIR/job.json records the last job submitted there (executor, job id, job name, submitit folder).
A job is *alive* while SLURM still queues or runs it *for this folder* (`scontrol show job`, whose StdOut must
lie in the folder's submitit folder, since ids restart on a fresh cluster) or while its local submitit
controller process runs. JOB_DIR/provenance.json lists the attempts (the trainer writes its own; the launcher
records the other kinds'), which is how a waiter tells a requeue from a failure. A run has *finished training*
when its newest checkpoint is the final step: the trainer writes that checkpoint before it exports the model
and writes done.json.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from neuclip.atomic import write_json
from neuclip.train import checkpoint as ckpt
from neuclip.train.config import identity_diff


# The kinds of job the launcher runs: how messages name each, what runs inside it, whether it is distributed.
@dataclass(frozen=True)
class Kind:
    command: str  # how messages name it
    run: str  # "module:function" called with the job's cfg inside the job (imported there: no torch here)
    distributed: bool  # several tasks share the work; otherwise the job must have one task


KINDS = {
    "train": Kind("neuclip train", "neuclip.error_study.tracking:train", True),  # the trainer with its tracker
    "eval": Kind("neuclip eval", "neuclip.jobs.stages:run_eval", False),
    # on the training cell's allocation; see stages.run_error for which ranks work
    "error-run": Kind("neuclip error run", "neuclip.jobs.stages:run_error", True),
    "error-sweep": Kind("neuclip error sweep", "neuclip.jobs.stages:run_sweep", False),
}

JOB_FILE = "job.json"

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


# -- job names --------------------------------------------------------------------------------------------

NAME_MAX = 64  # sacct/squeue show what fits; longer names are shortened and tagged with a hash
_UNSAFE = re.compile(r"[^A-Za-z0-9_=+-]+")  # "." is the separator, so it is replaced inside a component


def job_name(cfg: dict) -> str:
    """The SLURM job name: the grid cell and, but for training, the stage:
    `experiment.dataset.method[.variant].sSEED[.STAGE]` (STAGE e.g. `eval-tiny`, `error`), or
    `experiment.STAGE` for a stage of the whole experiment (the error sweep).

    Taken from the config's `meta` labels (the workflow fills them; variant "default" is left out). A name
    that had to be shortened or cleaned gets a 6-hex hash of the full cell, so names stay unique per grid.
    A job started by hand (no meta) is named after its folder, `neuclip.PARENT.NAME.HASH`, the hash being
    that of the absolute folder.
    """
    meta = cfg.get("meta") or {}
    stage = meta.get("stage") or "train"
    tail = [] if stage == "train" else [stage + (f"-{meta['suite']}" if meta.get("suite") else "")]
    if all(meta.get(k) not in (None, "") for k in ("experiment", "dataset", "method", "seed")):
        raw = [meta["experiment"], meta["dataset"], meta["method"]]
        if meta.get("variant") not in (None, "", "default"):
            raw.append(meta["variant"])
        raw += [f"s{meta['seed']}", *tail]
        key, tagged = "\0".join(map(str, raw)), False
    elif tail and meta.get("experiment") not in (None, "") and meta.get("dataset") in (None, ""):
        raw = [meta["experiment"], *tail]
        key, tagged = "\0".join(map(str, raw)), False
    else:
        run_dir = Path(cfg["run_dir"]).absolute()
        raw = ["neuclip", run_dir.parent.name, run_dir.name]
        key, tagged = str(run_dir), True
    parts = [_UNSAFE.sub("-", str(p)).strip("-") or "_" for p in raw]
    tagged = tagged or parts != [str(p) for p in raw]
    if not tagged and len(".".join(parts)) <= NAME_MAX:
        return ".".join(parts)
    tag = hashlib.sha1(key.encode()).hexdigest()[:6]
    while len(".".join(parts)) + 1 + len(tag) > NAME_MAX:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[longest] = parts[longest][:-1]
    return ".".join([*parts, tag])


# -- the job record and the scheduler ---------------------------------------------------------------------


def write_job_record(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / JOB_FILE, record, indent=2)


def record_attempt(job_dir: Path, rank: int = 0) -> None:
    """Append this attempt to JOB_DIR/provenance.json (for the kinds whose work does not write one itself)."""
    import datetime as dt
    import os
    import socket

    if rank != 0:
        return
    path = Path(job_dir) / "provenance.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("attempts", []).append(
        {
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "resumed_from_step": None,
        }
    )
    write_json(path, doc, indent=2)


def job_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None


def scontrol_job(job_id: str) -> dict | None:
    """`scontrol show job -o ID` as a dict, or None if SLURM does not know the job (any more)."""
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        return None
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
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


def sacct_state(job_id: str) -> str | None:
    """The job's state in SLURM's accounting (which, unlike scontrol, keeps finished jobs), or None."""
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        return None
    try:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split() if out.returncode == 0 else []
    return lines[-1].split("+")[0] if lines else None


def alive_slurm_job(run_dir: Path):
    """The SLURM job recorded in RUN/job.json if it is still queued or running *for this run*, else None."""
    record = job_record(run_dir)
    if not record or record.get("executor") != "slurm":
        return None
    job_id = str(record.get("job_id", ""))
    info = scontrol_job(job_id)
    if not info:
        return None
    state = info.get("JobState", "").split("+")[0]
    folder = Path(record["folder"])
    stdout = info.get("StdOut", "")
    if state not in ALIVE_STATES or not stdout.startswith(str(folder.parent)):
        return None
    import submitit

    return submitit.SlurmJob(folder=folder, job_id=job_id)


def pid_alive(pid: int, marker: bytes = b"submitit") -> bool:
    """Whether `pid` runs (not a zombie) a command line containing `marker`."""
    try:
        for _ in range(20):  # a process that is still exec-ing shows an empty command line for a moment
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                return False  # exited, not yet reaped
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if cmdline:
                break
            time.sleep(0.05)
    except (ValueError, IndexError, OSError):
        return False
    return marker in cmdline


def alive_local_job(run_dir: Path):
    """The local-executor job recorded in RUN/job.json if its submitit controller still runs, else None."""
    record = job_record(run_dir)
    if not record or record.get("executor") != "local":
        return None
    try:
        pid = int(record["job_id"])
    except (KeyError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    import submitit

    return submitit.LocalJob(folder=Path(record["folder"]), job_id=str(pid))


def final_checkpoint(cfg: dict) -> dict | None:
    """The run's newest checkpoint if it is its final step and was written with this config, else None.

    Returns {"path", "step"}. Only the checkpoint's small fields are read (memory-mapped).
    """
    import torch


    found = ckpt.list_checkpoints(Path(cfg["run_dir"]) / "checkpoints")
    if not found:
        return None
    step, path = found[-1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        total = int(state["scheduler"]["total_steps"])
        same = not identity_diff(state["config"], cfg)
    except Exception:  # noqa: BLE001 - unreadable or another format: not evidence of a finished run
        return None
    if step != total or not same:
        return None
    return {"path": path, "step": step}


def live_job(cfg: dict):
    """The job of this run that is still alive (SLURM or local, whatever the current executor), or None."""
    run_dir = Path(cfg["run_dir"])
    return alive_slurm_job(run_dir) or alive_local_job(run_dir)
