"""Waiting for a submitted job until its final state, through requeues, and no longer than its driver lives.

`wait` follows the job, not one attempt. SLURM requeues (preemption, `scontrol requeue`, submitit's own
requeue at a time limit) and the local controller's restarts are logged and waited through; only a final
job state is a verdict. An attempt that ended in an error result (the trainer raises Preempted on SIGTERM,
which submitit records as an error) is not a failure while the job lives on: it is reported as preempted
once the next attempt starts (each attempt appends itself to RUN/provenance.json).

The waiter stops when the process that started it exits: its parent or grandparent, i.e. Snakemake and the
shell it runs a rule in **(choice: two levels)**. So a killed driver leaves no pollers behind; the job keeps
running, and the next `neuclip train` (or eval, error run, error sweep) of the same job re-attaches to it
(neuclip/jobs/records.py). A waiter
started with `nohup ... &` from a shell that then exits stops too; use `neuclip train --detach` for that.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from neuclip.jobs.records import ALIVE_STATES, pid_alive, sacct_state, scontrol_job

# `neuclip train` exits with this when its driver died while it waited (EX_TEMPFAIL, like the trainer's
# EXIT_PREEMPTED): the job itself goes on, and a rerun re-attaches to it.
EXIT_DRIVER_GONE = 75
# SLURM ends a preempted job in PREEMPTED unless it requeues it, which it does a moment later: wait this long
# before taking PREEMPTED as final.
PREEMPTED_GRACE_S = 300
POLL_S = 1.0  # result file, attempts and the driver: cheap local checks
STATE_POLL_MAX_S = 30.0  # scheduler queries back off from 1 s to this (reset when the state changes)
RESULT_LATENCY_S = 20.0  # after a final state, how long the result file may take to appear (shared FS)
UNKNOWN_LIMIT_S = 600.0  # a job that neither scontrol nor sacct knows for this long is given up


def _ancestors(depth: int = 2) -> list[tuple[int, str]]:
    """(pid, start time) of this process's parent and grandparent, up to `depth` levels; pid 0 and 1 never count."""
    out, pid = [], os.getpid()
    for _ in range(depth):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            break
        pid = int(fields[1])  # ppid
        if pid <= 1:
            break
        try:
            start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            break
        out.append((pid, start))
    return out


def _ancestor_gone(ancestors: list[tuple[int, str]]) -> int | None:
    """The first recorded ancestor that has exited (or been replaced by another process), else None."""
    for pid, start in ancestors:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return pid
        if fields[0] in "ZX" or fields[19] != start:
            return pid
    return None


def _exception_line(trace: str) -> str:
    lines = [ln for ln in str(trace).strip().splitlines() if ln.strip() and not ln.startswith(" ")]
    return lines[-1].strip() if lines else "(no traceback)"


class _Waiter:
    """Polls one job until a final state: the result file and attempts every POLL_S, the scheduler less often.

    `poll()` returns None while waiting, else the exit status. The state it keeps: the result file last
    judged (an error result is *pending* until the job reaches a final state, and *stale* once a newer attempt
    has started), the exception that ended each attempt, and the scheduler's last state with its poll timer.
    """

    def __init__(self, job, run_dir: Path, label: str = "neuclip train"):
        from submitit.core.utils import JobPaths

        self.job, self.run_dir, self.label = job, Path(run_dir), label
        self.is_slurm = type(job).__name__ == "SlurmJob"
        self.paths = JobPaths(job.paths.folder, job_id=str(job.job_id), task_id=0)  # rank 0's result
        self.ancestors = _ancestors()
        self.seen_result = self.stale_result = self.pending_error = None
        self.errors: dict[int, str] = {}  # attempt number -> the exception that ended it
        self.n_attempts = len(self._attempts())
        self.first_attempt = self.n_attempts + 1  # attempts before it belong to earlier jobs of this folder
        self.state, self.state_at, self.state_delay = None, 0.0, 1.0
        self.reason = None  # SLURM's Reason for the state (a pending job's: Priority, ReqNodeNotAvail, ...)
        self.final_at = self.preempted_at = self.unknown_at = None

    # -- what there is to look at --------------------------------------------------------------------
    def _result(self):
        """(file identity, outcome, value) of the result file, or None while there is none."""
        from submitit.core.utils import pickle_load

        path = self.paths.result_pickle
        try:
            st = path.stat()
            outcome, value = pickle_load(path)
        except (OSError, EOFError, ValueError):
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size), outcome, value

    def _scheduler_state(self) -> str:
        """The scheduler's state for the job: a SLURM state name, or RUNNING / FINISHED for a local one."""
        if not self.is_slurm:
            process = getattr(self.job, "_process", None)
            if process is not None:
                return "RUNNING" if process.poll() is None else "FINISHED"
            return "RUNNING" if pid_alive(int(self.job.job_id)) else "FINISHED"
        info = scontrol_job(str(self.job.job_id))
        state = info.get("JobState", "") if info else sacct_state(str(self.job.job_id))
        reason = info.get("Reason") if info else None
        self.reason = None if reason in (None, "", "None", "(null)") else reason
        return (state or "UNKNOWN").split("+")[0].upper()

    def _attempts(self) -> list[dict]:
        try:
            return json.loads((self.run_dir / "provenance.json").read_text())["attempts"]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _say(self, msg: str) -> None:
        print(f"{self.label}: job {self.job.job_id}: {msg}", file=sys.stderr, flush=True)

    # -- one poll ------------------------------------------------------------------------------------
    def _follow_attempts(self) -> None:
        """Log each attempt the trainer has started since the last poll, and why the one before it ended."""
        attempts = self._attempts()
        for number in range(self.n_attempts + 1, len(attempts) + 1):
            start = attempts[number - 1].get("resumed_from_step")
            where = f"resumes from step {start}" if start is not None else "resumes (finished work is kept)"
            if number > self.first_attempt and self._same_job(attempts[number - 2]):
                why = self.errors.get(number - 1, "it ended without a result: requeued by SLURM after a preemption, "
                                                  "a time limit or a lost node")
                self._say(f"attempt {number - 1} was stopped ({why}); attempt {number} {where}")
            elif number > 1:  # the attempt before belongs to an earlier job of this folder: its story is not ours
                self._say(f"attempt {number} of this folder starts in this job; it {where}")
            if self.pending_error is not None:  # an attempt followed it: it was not the job's last word
                self.stale_result, self.pending_error = self.seen_result, None
        self.n_attempts = max(self.n_attempts, len(attempts))

    def _same_job(self, attempt: dict) -> bool:
        """Whether an attempt ran in the job this waiter follows (SLURM records the job id in each attempt)."""
        recorded = attempt.get("slurm_job_id")
        return recorded is None or not self.is_slurm or str(recorded) == str(self.job.job_id)

    def _read_result(self) -> int | None:
        result = self._result()
        if result is None or result[0] == self.seen_result:
            return None
        self.seen_result = result[0]
        if result[1] == "success":
            print(json.dumps(result[2]), flush=True)
            return 0
        # Called after _follow_attempts: an error result belongs to the newest attempt.
        self.pending_error = result[2]
        self.errors[self.n_attempts] = line = _exception_line(result[2])
        self.state_at, self.state_delay = 0.0, 1.0  # ask the scheduler now whether the job lives on
        self._say(
            f"attempt {self.n_attempts} ended with an error ({line}); waiting for the job's final state "
            "(a preempted job is requeued and resumes)"
        )
        return None

    def _update_state(self, now: float) -> None:
        """Ask the scheduler, backing off while nothing changes; sets final_at once the state is final."""
        if now < self.state_at:
            return
        before = self.reason
        new = self._scheduler_state()
        if new != self.state or (new == "PENDING" and self.reason != before):
            why = f" (SLURM's reason: {self.reason})" if self.reason and new in ("PENDING", "FAILED", "NODE_FAIL",
                                                                                  "REQUEUED", "SUSPENDED") else ""
            if self.state is not None or why:
                self._say(f"{self.state or 'submitted'} -> {new}{why}")
            self.state, self.state_delay = new, 1.0
        self.state_delay = min(2 * self.state_delay, STATE_POLL_MAX_S if self.is_slurm else POLL_S)
        self.state_at = now + self.state_delay
        self.preempted_at = (self.preempted_at or now) if new == "PREEMPTED" else None
        self.unknown_at = (self.unknown_at or now) if new == "UNKNOWN" else None
        alive = (
            new in ALIVE_STATES
            or (new == "PREEMPTED" and now - self.preempted_at < PREEMPTED_GRACE_S)
            or (new == "UNKNOWN" and now - self.unknown_at < UNKNOWN_LIMIT_S)
        )
        self.final_at = None if alive else (self.final_at or now)
        if self.final_at is not None:
            self.state_at = now + POLL_S  # watch closely while the result may still be arriving

    def poll(self) -> int | None:
        gone = _ancestor_gone(self.ancestors)
        if gone is not None:
            self._say(
                f"the process that started this wait (pid {gone}) has exited, so this waiter stops too; "
                "the job goes on, and rerunning the same command re-attaches to it"
            )
            return EXIT_DRIVER_GONE
        self._follow_attempts()
        status = self._read_result()
        if status is not None:
            return status
        now = time.monotonic()
        self._update_state(now)
        if self.final_at is None:
            return None
        if self.pending_error is not None and self.seen_result != self.stale_result:
            self._say(f"failed (final state {self.state}):\n{self.pending_error}\nlogs: {self.paths.stderr}")
            return 1
        if now - self.final_at >= RESULT_LATENCY_S:
            self._say(
                f"ended in state {self.state} without a result (killed, out of memory, node lost, "
                f"cancelled or out of requeues); logs: {self.paths.stderr}"
            )
            return 1
        return None

    def run(self) -> int:
        while (status := self.poll()) is None:
            time.sleep(POLL_S)
        return status


def wait(job, run_dir: Path | None = None, label: str = "neuclip train") -> int:
    """Wait for `job` through its requeues; 0 on success, 1 (with the remote traceback) on a final failure,
    EXIT_DRIVER_GONE if the process that started this one exits first. `run_dir` is the job folder (its
    provenance.json lists the attempts); `label` prefixes the messages (the command that waits)."""
    if type(job).__name__ == "DebugJob":  # the debug executor runs the job here, inside result()
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            done = job.result()
        except (FailedJobError, UncompletedJobError) as err:
            print(f"{label}: debug job failed:\n{err}", file=sys.stderr, flush=True)
            return 1
        print(json.dumps(done), flush=True)
        return 0
    # The job folder is RUN/submitit/<executor>/<job id>.
    return _Waiter(job, Path(run_dir) if run_dir else Path(job.paths.folder).parents[2], label).run()
