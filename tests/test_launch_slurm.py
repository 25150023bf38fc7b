"""The launcher on the real single-machine SLURM test cluster (slurm/testcluster/).

1. A waiting `neuclip train` follows its job through both kinds of requeue, submitit's own (USR2, as before a
   time limit) and SLURM's (`scontrol requeue`: SIGTERM, the trainer's Preempted, an error result), and
   succeeds; the run resumes to the uninterrupted result; the job carries its cell's name.
2. The driver is SIGKILLed while one cell has just finished and another still runs: its waiters stop with it;
   after a restart the finished cell is exported in-process and the live one re-attached to, with no second
   SLURM job for either.
3. On the two namespaced hosts (partition `two`): 2 nodes x 1 task through submitit equal 1 process on the
   same global batch, and a 2-node run requeued by `scontrol requeue` resumes on both nodes, bit-identical.

Uses a running cluster (`.ci/run` starts one; or `slurm/testcluster/start.sh`) or starts one itself.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuclip.grid.launcher import resolve_launcher
from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import (
    last_logged_step,
    run_attempts,
    tensors_equal,
    tiny_config,
    train_pattern,
    write_config,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
# The accounting database outlives test sessions: a per-session experiment label keeps job names apart.
EXPERIMENT = f"t{os.getpid()}"


@pytest.fixture(scope="module")
def slurm_env(slurm_cluster):
    return slurm_cluster


def _cell(tmp_path: Path, synth_data: Path, name: str, steps: int, seed: int = 0) -> dict:
    """A tiny SLURM run labelled as one grid cell (the workflow fills `meta` the same way)."""
    meta = {"experiment": EXPERIMENT, "dataset": "synthetic", "method": "fastclip", "variant": name, "seed": seed}
    return resolve_launcher(tiny_config(
        tmp_path / name,
        train_pattern(synth_data),
        **{
            "train.max_steps": steps,
            "train.checkpoint_every": 1000,
            "train.log_every": 2,
            "launcher.executor": "slurm",
            "launcher.site": str(REPO / "slurm" / "site.yaml"),
            "launcher.timeout_min": 10,
            "launcher.gpus_per_node": 0,
            "meta": meta,
        },
    ))


def _job_id(run_dir: Path, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while not (run_dir / "job.json").exists():
        assert time.time() < deadline, f"no job.json in {run_dir}"
        time.sleep(0.2)
    return json.loads((run_dir / "job.json").read_text())["job_id"]


def _until(what: str, cond, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.2)


def _sacct_names(job_ids) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,JobName", *[f"-j{j}" for j in job_ids]],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return dict(line.split("|", 1) for line in out.split())


def _jobs_named(name: str) -> list[str]:
    """Every SLURM job (any state, from the accounting database) carrying `name`."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-a", "-S", "now-1hour", "-o", "JobID", f"--name={name}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.split()


def _train_cli(cfg_path: Path, err: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "neuclip.cli", "train", str(cfg_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(err, "w"),  # noqa: SIM115 - the child owns it
    )


def test_a_waiting_launcher_follows_both_requeues_to_success(slurm_env, synth_data, tmp_path):
    from neuclip.error_study.tracking import train
    from neuclip.jobs import launch
    from neuclip.jobs.records import job_name

    steps = 120
    cfg = _cell(tmp_path, synth_data, "requeue", steps)
    run_dir = Path(cfg["run_dir"])
    err = tmp_path / "waiter.err"
    waiter = _train_cli(write_config(tmp_path / "requeue.yaml", cfg), err)
    job_id = _job_id(run_dir)
    assert launch.submit(cfg).job_id == job_id  # a second launch re-attaches instead of submitting again

    def at(attempt: int, steps_in: int):
        def ready():
            attempts = run_attempts(run_dir)
            start = attempts[-1]["resumed_from_step"] if attempts else 0
            return len(attempts) == attempt and last_logged_step(run_dir) >= start + steps_in

        return ready

    _until("attempt 1 did not start training", at(1, 20))
    # What SLURM sends before a time limit (--signal=USR2@...): the trainer checkpoints, submitit requeues.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    _until("attempt 2 did not get going", at(2, 10))
    # SLURM's own requeue (preemption, an admin): SIGTERM, the trainer checkpoints and raises Preempted.
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    ref = _cell(tmp_path, synth_data, "ref", steps)
    ref["launcher"]["executor"] = "inprocess"
    train(ref)  # the uninterrupted reference, meanwhile
    assert waiter.wait(timeout=300) == 0, err.read_text()[-3000:]

    log = err.read_text()
    assert "attempt 1 was stopped (it ended without a result: requeued by SLURM" in log, log
    assert "attempt 2 was stopped (" in log and "Preempted: stopped by SIGTERM" in log, log
    attempts = run_attempts(run_dir)
    assert len(attempts) == 3 and all(a["slurm_job_id"] == job_id for a in attempts), attempts
    assert 20 <= attempts[1]["resumed_from_step"] < attempts[2]["resumed_from_step"] < steps, attempts
    a = torch.load(ckpt.checkpoint_path(Path(ref["run_dir"]) / "checkpoints", steps), weights_only=True)
    b = torch.load(ckpt.checkpoint_path(run_dir / "checkpoints", steps), weights_only=True)
    for part in ("model", "estimator", "optimizer", "data"):
        assert tensors_equal(a[part], b[part]) == [], part
    assert _sacct_names([job_id]) == {job_id: job_name(cfg)} == {job_id: f"{EXPERIMENT}.synthetic.fastclip.requeue.s0"}
    assert launch.launch(cfg) == 0  # done.json: nothing is submitted


def test_a_killed_driver_leaves_no_waiters_and_a_restart_submits_no_second_job(slurm_env, synth_data, tmp_path):
    from neuclip.jobs.records import job_name

    done_cfg, live_cfg = _cell(tmp_path, synth_data, "short", 8), _cell(tmp_path, synth_data, "long", 200, seed=1)
    names = [job_name(done_cfg), job_name(live_cfg)]
    assert names[0] != names[1]
    paths = [write_config(tmp_path / f"{n}.yaml", c) for n, c in (("short", done_cfg), ("long", live_cfg))]
    done_dir, live_dir = Path(done_cfg["run_dir"]), Path(live_cfg["run_dir"])
    # The driver runs each cell as Snakemake does: a shell that runs `neuclip train` (and does not exec it).
    shells = [
        f"{shlex.quote(sys.executable)} -m neuclip.cli train {shlex.quote(str(p))} 2> {shlex.quote(str(p))}.err; true"
        for p in paths
    ]
    spawn = (
        "import subprocess, sys, time\n"
        "for cmd in sys.argv[1:]: print(subprocess.Popen(['bash', '-c', cmd]).pid, flush=True)\n"
        "time.sleep(600)"
    )
    driver = subprocess.Popen([sys.executable, "-c", spawn, *shells], cwd=REPO, stdout=subprocess.PIPE, text=True)
    shell_pids = [int(driver.stdout.readline()) for _ in shells]
    live_id = _job_id(live_dir)
    try:
        _until("the short cell did not finish", lambda: (done_dir / "done.json").exists())
        _until("the long cell did not start training", lambda: last_logged_step(live_dir) >= 2)
        # Hold the long cell (SUSPENDED is alive) so that it is still running when the driver is back.
        subprocess.run(["scontrol", "suspend", live_id], check=True, timeout=30)
        waiters = _children(shell_pids)  # the short cell's waiter may have seen its success and exited already
        assert waiters, "no `neuclip train` waiter under the driver's shells"
        driver.kill()
        driver.wait()
        _until("a waiter outlived its driver", lambda: not any(_running(p) for p in waiters), timeout=30)

        (done_dir / "done.json").unlink()  # what Snakemake's rerun-incomplete does to a job it lost track of
        done_ids = _jobs_named(names[0])
        restart = subprocess.run(
            [sys.executable, "-m", "neuclip.cli", "train", str(paths[0])], cwd=REPO, capture_output=True, text=True
        )
        assert restart.returncode == 0, restart.stderr[-3000:]
        assert "exporting it here, without submitting a job" in restart.stderr, restart.stderr
        assert (done_dir / "done.json").exists() and (done_dir / "model").is_dir()
        assert _jobs_named(names[0]) == done_ids and len(done_ids) == 1

        err = tmp_path / "long-restart.err"
        again = _train_cli(paths[1], err)
        _until("the restarted launcher did not re-attach", lambda: "re-attaching" in err.read_text(), timeout=120)
        subprocess.run(["scontrol", "resume", live_id], check=True, timeout=30)
        assert again.wait(timeout=300) == 0, err.read_text()[-3000:]
        assert f"re-attaching to job {live_id}" in err.read_text()
        assert _jobs_named(names[1]) == [live_id]
        assert json.loads((live_dir / "done.json").read_text())["steps"] == 200
    finally:
        driver.kill()
        subprocess.run(["scancel", live_id], timeout=30)


def _children(pids: list[int]) -> list[int]:
    """The processes whose parent is one of `pids`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in pids:
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _sacct_allocations(job_id: str) -> list[tuple[str, str]]:
    """(NodeList, State) of every allocation of the job, oldest first (-D keeps the requeued ones)."""
    out = subprocess.run(
        ["sacct", "-X", "-D", "-n", "-P", "-o", "NodeList,State", "-j", job_id],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [tuple(line.split("|")[:2]) for line in out.split()]


def test_two_nodes_equal_one_process_and_a_requeue_resumes_on_both_bit_identically(
    slurm_env, two_nodes, synth_data, tmp_path
):
    """2 nodes x 1 task (gloo over the namespaced hosts, TorchDistributedEnvironment through submitit) on the
    same global batch as 1 process: same losses, parameters and estimator state after 6 steps (1e-5). A longer
    2-node run preempted with `scontrol requeue` resumes on both nodes and ends bit-identical to an
    uninterrupted one."""
    from neuclip.error_study.tracking import train
    from neuclip.jobs import launch
    from tests.test_train_distributed import _param_diff

    def two_node(name: str, steps: int) -> dict:
        cfg = _cell(tmp_path, synth_data, name, steps)
        cfg["train"]["checkpoint_every"] = 1000
        cfg["launcher"].update(partition=two_nodes, nodes=2, tasks_per_node=1, gpus_per_node=0, cpus_per_task=1)
        return cfg

    short, long_ref, requeued = two_node("short2n", 6), two_node("ref2n", 150), two_node("requeued2n", 150)
    one = _cell(tmp_path, synth_data, "one", 6)
    one["launcher"]["executor"] = "inprocess"
    jobs = [launch.submit(c) for c in (short, long_ref)]
    err = tmp_path / "requeued.err"
    waiter = _train_cli(write_config(tmp_path / "requeued.yaml", requeued), err)
    train(one)  # the 1-process reference, meanwhile
    run_dir = Path(requeued["run_dir"])
    job_id = _job_id(run_dir)

    def started(attempt: int, steps_in: int):
        def ready():
            attempts = run_attempts(run_dir)
            begin = attempts[-1]["resumed_from_step"] if attempts else 0
            return len(attempts) == attempt and last_logged_step(run_dir) >= begin + steps_in

        return ready

    _until("the 2-node run did not start training", started(1, 20), timeout=300)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    assert waiter.wait(timeout=400) == 0, err.read_text()[-3000:]
    for job in jobs:
        assert launch.wait(job, Path(job.paths.folder).parents[2]) == 0, f"see {job.paths.folder}"

    # 2 nodes x 1 task == 1 process on the same global batch
    def metrics(cfg):
        return [json.loads(x) for x in (Path(cfg["run_dir"]) / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(metrics(one), metrics(short), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), (a, b)
    s1 = torch.load(ckpt.checkpoint_path(Path(one["run_dir"]) / "checkpoints", 6), weights_only=True)
    s2 = torch.load(ckpt.checkpoint_path(Path(short["run_dir"]) / "checkpoints", 6), weights_only=True)
    assert s2["world_size"] == 2
    assert max(_param_diff(k, s1["model"][k], s2["model"][k]) for k in s1["model"]) < 1e-5
    for k in s1["estimator"]:
        torch.testing.assert_close(s2["estimator"][k], s1["estimator"][k], rtol=1e-5, atol=1e-5)

    # the requeue: SLURM's own (SIGTERM, checkpoint, Preempted), then a second allocation on both nodes again
    # the waiter's verdict comes from the job itself; SLURM's accounting records the allocation's end a moment
    # later (once a CI run read RUNNING here): wait for that state, not for a duration
    not_ended = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")
    _until("accounting never recorded the second allocation's end",
           lambda: len(a := _sacct_allocations(job_id)) == 2 and a[-1][1] not in not_ended, timeout=120)
    allocations = _sacct_allocations(job_id)
    assert [state for _, state in allocations] == ["REQUEUED", "COMPLETED"], allocations
    assert all(nodes == "node[1-2]" for nodes, _ in allocations), allocations
    attempts = run_attempts(run_dir)
    assert len(attempts) == 2 and all(a["world_size"] == 2 for a in attempts), attempts
    assert 20 <= attempts[1]["resumed_from_step"] < 150, attempts
    a = torch.load(ckpt.checkpoint_path(Path(long_ref["run_dir"]) / "checkpoints", 150), weights_only=True)
    b = torch.load(ckpt.checkpoint_path(run_dir / "checkpoints", 150), weights_only=True)
    for part in ("model", "estimator", "optimizer", "data"):
        assert tensors_equal(a[part], b[part]) == [], part
    # rank 0 ran on host node1 (its own hostname and address); one task per node puts rank 1 on node2
    assert [a["hostname"] for a in attempts] == ["node1", "node1"], attempts
