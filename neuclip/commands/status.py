"""`neuclip status RUNS_DIR [--watch]`: one row per grid cell of an experiment's runs folder.

Cells are the union of the train configs the workflow wrote (RUNS_DIR/configs/<cell>.yaml, each naming its
run_dir) and the run folders present (RUNS_DIR/<dataset>/<method>/<variant>/seed<seed>). Per cell it reads
only files and the scheduler, never a checkpoint:
- done.json -> done;
- RUN/job.json (written by neuclip/jobs/launch.py) and, when SLURM is there, one `squeue` for all jobs and one
  `sacct` for those squeue no longer lists -> queued / running / requeued / failed, with the job id; a
  queued job whose run already has an attempt in provenance.json, or a REQUEUED state, is "requeued";
- a trainer holding RUN/.lock (seen in /proc/locks, without taking the lock) -> running;
- otherwise a folder with attempts but no live job -> failed, with the last error line of its job's log
  (submitit's *_log.err, else the workflow's logs/train/<cell>.log);
- no folder or no attempt yet -> not started.
Step k of N, samples/s and the last loss come from metrics.jsonl's last line, N from config.yaml (max_steps,
or epochs x the steps per epoch that the last line's step/epoch give), ETA = (N - k) x batch / samples/s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from neuclip.yamlio import yaml_load

CELL = re.compile(r"^(?P<dataset>[^/]+)/(?P<method>[^/]+)/(?P<variant>[^/]+)/seed(?P<seed>\d+)$")
FAILED_STATES = {"FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE", "REVOKED"}  # fmt: skip
EXCEPTION_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt|Exit)\b")  # Python's last traceback line
ERROR_LINE = re.compile(r"\b(error|failed|killed|cancelled)\b", re.I)  # srun, slurmstepd, the launcher
COLUMNS = ("cell", "state", "job", "step", "samples/s", "eta", "loss", "last error")


@dataclass
class Row:
    cell: str
    run_dir: Path
    state: str = "not started"
    job: str = ""
    step: int | None = None
    total: int | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    loss: float | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)


# -- the cells --------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    try:
        return yaml_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def cells(runs_dir: Path) -> dict[str, Path]:
    """cell key -> run folder, from the written train configs and the run folders found."""
    found: dict[str, Path] = {}
    configs = runs_dir / "configs"
    for cfg_file in sorted(configs.rglob("*.yaml")) if configs.is_dir() else []:
        key = cfg_file.relative_to(configs).with_suffix("").as_posix()
        if CELL.match(key):
            run_dir = _read_yaml(cfg_file).get("run_dir")
            # The workflow writes run_dir relative to Snakemake's working directory, which need not be ours:
            # a relative one is RUNS_DIR/<cell> (workflow.run_dir's layout).
            found[key] = Path(run_dir) if run_dir and Path(run_dir).is_absolute() else runs_dir / key
    for marker in ("config.yaml", "job.json", "done.json"):
        for path in runs_dir.glob(f"*/*/*/seed*/{marker}"):
            key = path.parent.relative_to(runs_dir).as_posix()
            if CELL.match(key):
                found.setdefault(key, path.parent)
    return dict(sorted(found.items()))


# -- the scheduler ------------------------------------------------------------------------------------------


def _run(argv: list[str], timeout: float = 30) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def squeue() -> dict[str, tuple[str, str]] | None:
    """job id -> (state, name) of every job squeue lists; None without SLURM."""
    out = _run(["squeue", "-h", "-a", "-o", "%i|%T|%j"])
    if out is None:
        return None
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            jobs[parts[0]] = (parts[1], parts[2])
    return jobs


def sacct(job_ids: list[str]) -> dict[str, str]:
    """job id -> final state (one call for all); {} without accounting."""
    ids = [j for j in job_ids if re.fullmatch(r"\d+(_\d+)?", j)]
    out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)], timeout=60) if ids else None
    states = {}
    for line in (out or "").splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            states[job.strip()] = state.split()[0].split("+")[0] if state.strip() else ""
    return states


def lock_held(run_dir: Path) -> bool:
    """Whether some process holds RUN/.lock (the trainer's flock), read from /proc/locks (Linux) so that
    looking never takes the lock a starting trainer needs."""
    try:
        st = (run_dir / ".lock").stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return False
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" ("->" marks a waiter)
        fields = [f for f in line.split() if f != "->"]
        if len(fields) > 5 and fields[5] == ident:
            return True
    return False


# -- one cell -------------------------------------------------------------------------------------------


def _last_json_line(path: Path) -> dict:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
    return {}


def last_error_line(paths: list[Path]) -> str:
    """The last Python exception line (else the last line saying error/failed/killed) of the first log that
    has one."""
    for path in paths:
        try:
            lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            continue
        hits = [ln for ln in lines if EXCEPTION_LINE.match(ln)] or [ln for ln in lines if ERROR_LINE.search(ln)]
        if hits:
            return hits[-1][:200]
    return ""


def _job_logs(job: dict, runs_dir: Path, cell: str) -> list[Path]:
    folder, job_id = Path(job.get("folder", "")), str(job.get("job_id", ""))
    logs = sorted(folder.glob(f"{job_id}_*_log.err"), key=lambda p: p.stat().st_mtime) if job_id else []
    return [*reversed(logs), runs_dir / "logs" / "train" / f"{cell}.log"]


def total_steps(config: dict, last: dict) -> int | None:
    t = config.get("train") or {}
    if t.get("max_steps"):
        return int(t["max_steps"])
    if last.get("step") and last.get("epoch"):
        return max(1, round(t.get("epochs", 1) * round(last["step"] / last["epoch"])))
    n, b = (config.get("data") or {}).get("train_num_samples"), t.get("global_batch_size")
    return max(1, round(t.get("epochs", 1) * max(1, n // b))) if n and b else None


def cell_row(cell: str, run_dir: Path, runs_dir: Path, queue, accounting: dict) -> Row:
    row = Row(cell, run_dir)
    config = _read_yaml(run_dir / "config.yaml") or _read_yaml(runs_dir / "configs" / f"{cell}.yaml")
    last = _last_json_line(run_dir / "metrics.jsonl")
    row.step, row.total = last.get("step"), total_steps(config, last)
    row.samples_per_s, row.loss = last.get("samples_per_s"), last.get("loss")
    try:
        job = json.loads((run_dir / "job.json").read_text())
    except (OSError, ValueError):
        job = {}
    row.job = str(job.get("job_id", ""))
    try:
        attempts = len(json.loads((run_dir / "provenance.json").read_text()).get("attempts", []))
    except (OSError, ValueError):
        attempts = 0

    if (run_dir / "done.json").exists():
        try:
            done = json.loads((run_dir / "done.json").read_text())
        except (OSError, ValueError):
            done = {}
        row.state, row.step = "done", done.get("steps", row.step)
        row.total = done.get("steps", row.total)
        return row
    slurm_state = None
    if job.get("executor") == "slurm" and queue is not None:
        listed = queue.get(row.job)
        if listed and (not job.get("job_name") or listed[1] == job["job_name"]):
            slurm_state = listed[0]
        else:
            slurm_state = accounting.get(row.job) or "GONE"
    if slurm_state in ("PENDING", "CONFIGURING"):
        row.state = "requeued" if attempts else "queued"
    elif slurm_state and slurm_state.startswith("REQUEUE"):
        row.state = "requeued"
    elif slurm_state in ("RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING") or lock_held(run_dir):
        row.state = "running"
    elif job.get("executor") == "local" and _local_alive(job):
        row.state = "running"
    elif attempts or job:
        row.state = "failed"
        if slurm_state and slurm_state != "GONE":
            row.notes.append(slurm_state)
        row.error = last_error_line(_job_logs(job, runs_dir, cell))
    if row.state == "running" and row.samples_per_s and row.step is not None and row.total:
        batch = (config.get("train") or {}).get("global_batch_size")
        if batch:
            row.eta_s = (row.total - row.step) * batch / row.samples_per_s
    return row


def _local_alive(job: dict) -> bool:
    from neuclip.jobs.records import pid_alive

    try:
        return pid_alive(int(job["job_id"]))
    except (KeyError, ValueError):
        return False


def status(runs_dir: Path) -> list[Row]:
    found = cells(runs_dir)
    jobs = {}
    for run_dir in found.values():
        try:
            jobs[run_dir] = json.loads((run_dir / "job.json").read_text())
        except (OSError, ValueError):
            pass
    queue = squeue() if any(j.get("executor") == "slurm" for j in jobs.values()) else None
    unlisted = [str(j["job_id"]) for j in jobs.values() if j.get("executor") == "slurm" and queue is not None
                and str(j.get("job_id")) not in queue]  # fmt: skip
    accounting = sacct(unlisted) if unlisted else {}
    return [cell_row(cell, run_dir, runs_dir, queue, accounting) for cell, run_dir in found.items()]


# -- the table ----------------------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def table(rows: list[Row]) -> str:
    cells_ = [
        [
            r.cell,
            r.state + (f" ({', '.join(r.notes)})" if r.notes else ""),
            r.job,
            "" if r.step is None else f"{r.step}/{r.total if r.total else '?'}",
            "" if r.samples_per_s is None else f"{r.samples_per_s:.1f}",
            _duration(r.eta_s),
            "" if r.loss is None else f"{r.loss:.4f}",
            r.error,
        ]
        for r in rows
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells_]) for i, c in enumerate(COLUMNS)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no cells"
    return "\n".join([line(COLUMNS), *(line(c) for c in cells_), f"{len(rows)} cells: {summary}"])


def register(sub) -> None:
    parser = sub.add_parser(
        "status",
        help="one row per grid cell: state, SLURM job, step k/N, samples/s, ETA, loss, last error",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="an experiment's runs folder (runs/<experiment>)")
    parser.add_argument("--watch", type=float, nargs="?", const=10.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 10) until interrupted")  # fmt: skip
    parser.set_defaults(func=run_status)


def run_status(args) -> int:
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        print(f"neuclip status: {runs_dir} is not a folder (expected runs/<experiment>)", file=sys.stderr)
        return 1
    while True:
        text = table(status(runs_dir))
        if not args.watch:
            print(text)
            return 0
        clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
        print(f"{clear}{time.strftime('%H:%M:%S')}  {runs_dir}\n{text}", flush=True)
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
