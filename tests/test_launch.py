"""The launcher: submitit local timeout -> checkpoint -> requeue -> resume, followed by a re-attached waiter;
a finished run recognised from its folder; a waiter that dies with its driver; job names; SLURM re-attach;
sbatch safety."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from neuclip.grid.launcher import resolve_launcher
from neuclip.train import checkpoint as ckpt
from neuclip.train.config import ConfigError
from neuclip.train.testing import (
    last_logged_step,
    run_attempts,
    tensors_equal,
    tiny_config,
    train_pattern,
    write_config,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_local_executor_timeout_requeues_and_resumes_to_the_same_result(synth_data, tmp_path, capsys):
    from neuclip.jobs import launch

    steps = 60
    extra = {"train.max_steps": steps, "train.checkpoint_every": 1000, "train.log_every": 2}
    # A 45-s limit per attempt; submitit signals USR2 15 s before it. The trainer checkpoints at the next step
    # boundary, submitit requeues, the next attempt resumes. Start-up alone takes 7-17 s on this shared
    # machine, so instead of racing the clock the test sends the task that same signal once the first
    # attempt is a third of the way through (the limit's own USR2 may come first).
    cfg = tiny_config(
        tmp_path / "job",
        train_pattern(synth_data),
        **extra,
        **{
            "launcher.executor": "local",
            "launcher.timeout_min": 0.75,
            "launcher.signal_delay_s": 15,
            "launcher.max_num_timeout": 5,
        },
    )
    run_dir = Path(cfg["run_dir"])
    job = launch.submit(cfg)
    record = json.loads((run_dir / "job.json").read_text())
    assert record["executor"] == "local" and record["job_id"] == str(job.job_id)
    again = launch.submit(cfg)  # no second job on the same run folder: the live one is re-attached to
    assert again.job_id == job.job_id and again._process is None
    waited = {}  # the re-attached waiter (no process handle: it watches the controller's pid) follows the restart
    waiter = threading.Thread(target=lambda: waited.update(rc=launch.wait(again)))
    waiter.start()
    # The uninterrupted reference, meanwhile on the other core.
    ref = tiny_config(tmp_path / "ref", train_pattern(synth_data), **extra)
    ref_proc = subprocess.Popen(
        [sys.executable, "-m", "neuclip.cli", "train", str(write_config(tmp_path / "ref.yaml", ref))],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    interrupted = False
    while waiter.is_alive():
        attempts = run_attempts(run_dir)
        if not interrupted and len(attempts) == 1 and last_logged_step(run_dir) >= steps // 3:
            os.kill(attempts[0]["pid"], signal.SIGUSR2)  # what the controller sends its tasks at the limit
            interrupted = True
        time.sleep(0.2)
    waiter.join()
    assert waited["rc"] == 0, "see the job's logs in " + str(job.paths.folder)
    assert "attempt 1 was stopped (" in capsys.readouterr().err
    assert ref_proc.wait(timeout=300) == 0, ref_proc.stderr.read()[-3000:]
    ref_proc.stderr.close()

    attempts = json.loads((run_dir / "provenance.json").read_text())["attempts"]
    assert len(attempts) >= 2 and attempts[-1]["resumed_from_step"] > 0, attempts
    a = torch.load(ckpt.checkpoint_path(Path(ref["run_dir"]) / "checkpoints", steps), weights_only=True)
    b = torch.load(ckpt.checkpoint_path(run_dir / "checkpoints", steps), weights_only=True)
    for part in ("model", "estimator", "optimizer", "data"):
        assert tensors_equal(a[part], b[part]) == [], part
    assert (run_dir / "done.json").exists()
    assert launch.launch(cfg) == 0  # done: nothing is submitted again


def test_a_finished_run_is_recognised_from_its_folder_and_exported_here(synth_data, tmp_path, monkeypatch, capsys):
    from neuclip.error_study.tracking import train
    from neuclip.jobs import launch
    from neuclip.jobs import records as jobs

    extra = {"train.max_steps": 4, "train.checkpoint_every": 2, "launcher.executor": "local"}
    cfg = tiny_config(tmp_path / "run", train_pattern(synth_data), **extra)
    run_dir = Path(cfg["run_dir"])
    train(cfg)
    first = json.loads((run_dir / "done.json").read_text())
    weights = (run_dir / "model" / "open_clip_model.safetensors").read_bytes()
    # What a forced rerun, or Snakemake's rerun-incomplete after the driver died, leaves: no done.json (and
    # here no export either, as if the job was killed while exporting).
    (run_dir / "done.json").unlink()
    (run_dir / "model" / "open_clip_model.safetensors").unlink()
    monkeypatch.setattr(launch, "make_executor", lambda cfg: pytest.fail("submitted a job for a finished run"))
    assert launch.launch(cfg) == 0
    assert "exporting it here, without submitting a job" in capsys.readouterr().err
    again = json.loads((run_dir / "done.json").read_text())
    assert (again["steps"], again["final_tau"], again["final_loss"]) == (4, first["final_tau"], first["final_loss"])
    assert (run_dir / "model" / "open_clip_model.safetensors").read_bytes() == weights
    assert not (run_dir / "job.json").exists()

    # a run whose newest checkpoint is not its last step is not finished
    (run_dir / "done.json").unlink()
    ckpt.checkpoint_path(run_dir / "checkpoints", 4).unlink()
    assert ckpt.list_checkpoints(run_dir / "checkpoints")[-1][0] == 2 and jobs.final_checkpoint(cfg) is None


@pytest.mark.slow  # driver and job processes
def test_a_waiter_stops_with_its_driver_and_the_job_goes_on(tmp_path):
    """Driver -> shell -> waiter, as Snakemake -> bash -> `neuclip train`: SIGKILL the driver, and the waiter
    (orphaned below a surviving shell) stops by itself while the job runs on, for a later re-attach."""
    import submitit

    from neuclip.jobs.waiter import EXIT_DRIVER_GONE

    run_dir = tmp_path / "run"
    ex = submitit.LocalExecutor(run_dir / "submitit" / "local" / "%j")
    ex.update_parameters(timeout_min=5)
    job = ex.submit(time.sleep, 120)  # a real local job; what it runs does not matter to the waiter
    code = (
        "import sys, submitit; from neuclip.jobs.waiter import wait; print('waiting', file=sys.stderr, flush=True); "
        "sys.exit(wait(submitit.LocalJob(sys.argv[1], sys.argv[2]), sys.argv[3]))"
    )
    err, rc = tmp_path / "waiter.err", tmp_path / "waiter.rc"
    args = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-c", code, ex.folder, job.job_id, run_dir))
    shell = f"{args} 2> {shlex.quote(str(err))}; echo $? > {shlex.quote(str(rc))}"
    spawn = "import subprocess, sys, time; subprocess.Popen(['bash', '-c', sys.argv[1]]); time.sleep(300)"
    driver = subprocess.Popen([sys.executable, "-c", spawn, shell], cwd=REPO)
    try:
        deadline = time.time() + 60
        while "waiting" not in (err.read_text() if err.exists() else ""):
            assert time.time() < deadline, "the waiter did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # let it record its ancestors and poll once
        driver.kill()
        driver.wait()
        deadline = time.time() + 15
        while not rc.exists() or not rc.read_text().strip():
            assert time.time() < deadline, "the waiter outlived its driver"
            time.sleep(0.1)
        assert int(rc.read_text()) == EXIT_DRIVER_GONE, err.read_text()
        assert "has exited, so this waiter stops too" in err.read_text()
        assert not job.done()  # the job itself goes on
    finally:
        driver.kill()
        job.cancel()  # SIGINT to the controller, which then kills its task (it prints a KeyboardInterrupt)
        job._process.wait(timeout=60)


def test_job_names_carry_the_cell_and_are_unique_per_grid(tmp_path):
    import yaml

    from neuclip.grid import workflow as wf
    from neuclip.jobs.records import NAME_MAX, job_name

    for path in sorted((REPO / "workflows" / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        seen = {}
        for run in wf.runs(config):
            name = job_name(wf.train_config(config, run))
            assert seen.setdefault(name, run) == run, f"{path.name}: {run} and {seen[name]} are both {name}"
            labels = [config["experiment"], run.dataset, run.method, f"s{run.seed}"]
            labels += [run.variant] if run.variant != "default" else []
            assert len(name) <= NAME_MAX and all(label in name.split(".") for label in labels), (name, run)
    tiny = {"experiment": "tiny", "dataset": "synthetic", "method": "fastclip", "variant": "default", "seed": 0}
    assert job_name({"run_dir": "x", "meta": tiny}) == "tiny.synthetic.fastclip.s0"
    # shortened or cleaned names keep the cell apart with a hash of it
    cell = {"experiment": "e" * 40, "dataset": "d" * 30, "method": "neuclip", "seed": 0}
    long = [job_name({"run_dir": "x", "meta": {**cell, "variant": "v" * 30 + end}}) for end in "12"]
    assert long[0] != long[1] and all(len(n) <= NAME_MAX for n in long)
    dotted = [job_name({"run_dir": "x", "meta": {**cell, "experiment": e}}) for e in ("a.b", "a-b")]
    assert dotted[0] != dotted[1]
    # a run started by hand is named after its folder, kept apart from another folder of the same name
    by_hand = [job_name({"run_dir": str(tmp_path / p / "seed0"), "meta": {}}) for p in "ab"]
    assert by_hand[0] != by_hand[1] and all(n.startswith("neuclip.") and ".seed0." in n for n in by_hand)


def test_debug_executor_runs_the_job_in_process(synth_data, tmp_path):
    from neuclip.jobs import launch

    cfg = tiny_config(tmp_path / "ok", train_pattern(synth_data),
                      **{"train.max_steps": 2, "launcher.executor": "debug"})
    assert launch.launch(cfg) == 0  # (on failure the debug executor opens pdb: it is for debugging)
    assert json.loads((Path(cfg["run_dir"]) / "done.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_a_failed_job_exits_non_zero_with_the_remote_traceback(synth_data, tmp_path, capsys):
    from neuclip.jobs import launch

    cfg = tiny_config(
        tmp_path / "bad",
        train_pattern(synth_data),
        **{
            "train.max_steps": 2,
            "launcher.executor": "local",
            "launcher.timeout_min": 2,
            "data.data_size": 10,
        },
    )
    assert launch.launch(cfg) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError" in err and "raise data_size to max id + 1" in err, err


def _slurm_cfg(tmp_path: Path, synth_data: Path, **launcher) -> dict:
    site = tmp_path / "site.yaml"
    site.write_text(
        "partition: gpu\naccount: proj1\ngpu_type: h100\ngpus_per_node: 4\ncpus_per_task: 8\n"
        "mem_gb: 64\ntimeout_min: 240\nmax_num_timeout: 7\nslurm_additional_parameters: {constraint: ib}\n"
    )
    extra = {"launcher.executor": "slurm", "launcher.site": str(site), "launcher.nodes": 2}
    extra.update({f"launcher.{k}": v for k, v in launcher.items()})
    return resolve_launcher(tiny_config(tmp_path / "run dir", train_pattern(synth_data), **extra))


def test_slurm_script_uses_site_defaults_and_quotes_values(synth_data, tmp_path):
    from neuclip.jobs.launch import make_executor

    cfg = _slurm_cfg(tmp_path, synth_data, qos="high; rm -rf ~", slurm_additional_parameters={"comment": "a b"})
    la = cfg["launcher"]
    assert (la["partition"], la["gpus_per_node"], la["timeout_min"], la["max_num_timeout"]) == (
        "gpu",
        4,
        240,
        7,
    )
    ex = make_executor(cfg)
    script = ex._make_submission_file_text("python -m x", "uid")
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --account=proj1" in script
    assert "#SBATCH --gpus-per-node=h100:4" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --nodes=2" in script and "#SBATCH --time=240" in script and "#SBATCH --mem=64GB" in script
    assert "#SBATCH --constraint=ib" in script and "#SBATCH --comment='a b'" in script
    assert "#SBATCH --qos='high; rm -rf ~'" in script  # a quoted option value, never a command
    assert ex.max_num_timeout == 7


@pytest.mark.parametrize(
    "override",
    [
        'launcher.partition="gpu\\nrm -rf ~"',
        'launcher.slurm_additional_parameters={comment: "x\\ny"}',
        "launcher.slurm_additional_parameters={'bad key': 1}",
    ],
)
def test_control_characters_never_reach_sbatch(override):
    from neuclip.train.config import load_config

    with pytest.raises(ConfigError, match="launcher"):
        resolve_launcher(load_config(None, [override]))


def test_rerun_reattaches_to_a_live_slurm_job(synth_data, tmp_path, monkeypatch):
    from neuclip.jobs import launch
    from neuclip.jobs import records as jobs

    cfg = _slurm_cfg(tmp_path, synth_data)
    run_dir = Path(cfg["run_dir"])
    folder = run_dir / "submitit" / "slurm" / "%j"
    jobs.write_job_record(run_dir, {"executor": "slurm", "job_id": "4242", "folder": str(folder)})
    state = {"JobState": "RUNNING", "StdOut": str(run_dir / "submitit" / "slurm" / "4242" / "4242_0_log.out")}
    monkeypatch.setattr(jobs, "scontrol_job", lambda job_id: dict(state) if job_id == "4242" else None)
    monkeypatch.setattr(launch, "make_executor", lambda cfg: pytest.fail("submitted a second job"))
    job = launch.submit(cfg)
    assert job.job_id == "4242"

    # a finished job, or a live job of another run (ids restart on a fresh cluster), is not re-attached
    for change in ({"JobState": "COMPLETED"}, {"StdOut": "/elsewhere/4242_0_log.out"}):
        state.update(change)
        assert jobs.alive_slurm_job(run_dir) is None
        state.update(JobState="RUNNING", StdOut=str(run_dir / "submitit" / "slurm" / "4242" / "x.out"))


def test_cli_config_errors_name_the_key(tmp_path, capsys):
    from neuclip.cli import main

    assert main(["train", "run_dir=x", "data.train_shards=x.tar", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "warmup_steps" in err


class _FlakySbatch:
    """An executor whose sbatch fails `failures` times with `message`, then submits."""

    def __init__(self, failures: int, message: str):
        self.failures, self.message, self.tries = failures, message, 0

    def submit(self, job):
        from submitit.core.utils import FailedJobError

        self.tries += 1
        if self.tries <= self.failures:
            raise FailedJobError(self.message)
        return "job"


def test_sbatch_is_retried_while_the_controller_is_down(capsys):
    """sbatch failing with 'Unable to contact slurm controller' is retried with backoff (each try logged) for
    launcher.submit_retry_s; a non-transient failure is not retried; an outage longer than the limit fails,
    naming sbatch's message."""
    from neuclip.jobs.launch import Job, SubmissionFailed, _submit_retrying

    down = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"
    cfg = {"launcher": {"submit_retry_s": 100}}
    sleeps = []
    ex = _FlakySbatch(3, down)
    assert _submit_retrying(ex, Job("train", cfg), cfg, sleep=sleeps.append) == "job"
    assert ex.tries == 4 and sleeps == [5.0, 10.0, 20.0]
    assert capsys.readouterr().err.count("sbatch could not reach the controller") == 3
    with pytest.raises(SubmissionFailed, match=r"after 1 try .*not a controller outage.*Invalid partition"):
        _submit_retrying(_FlakySbatch(1, "sbatch: error: Invalid partition name"), Job("train", cfg), cfg,
                         sleep=sleeps.append)
    # a 30 s limit: waits of 5, 10 and 20 s fit, the next (40 s) would not
    with pytest.raises(SubmissionFailed, match=r"after 4 tries .*Unable to contact slurm controller"):
        _submit_retrying(_FlakySbatch(99, down), Job("train", cfg), {"launcher": {"submit_retry_s": 30}},
                         sleep=lambda s: None)


def test_a_new_jobs_first_attempt_is_not_blamed_for_an_earlier_jobs_end(tmp_path, capsys):
    """Attempts are kept per run folder; the waiter of job 22 must not say that attempt 1 (job 11, which died on
    a full disk) 'was preempted', and it names SLURM's reason for a pending state."""
    import json as _json
    from types import SimpleNamespace

    from neuclip.jobs import waiter as w

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "provenance.json").write_text(_json.dumps({"attempts": [{"slurm_job_id": "11"}]}))
    job = SimpleNamespace(job_id="22", paths=SimpleNamespace(folder=tmp_path / "submitit"))
    poller = w._Waiter(job, run_dir)
    poller.is_slurm = True
    attempts = [{"slurm_job_id": "11"}, {"slurm_job_id": "22", "resumed_from_step": 40},
                {"slurm_job_id": "22", "resumed_from_step": 60}]
    (run_dir / "provenance.json").write_text(_json.dumps({"attempts": attempts}))
    poller._follow_attempts()
    err = capsys.readouterr().err
    assert "attempt 1 was stopped" not in err and "attempt 2 of this folder starts in this job" in err, err
    assert "attempt 2 was stopped (it ended without a result: requeued by SLURM" in err, err
    poller._scheduler_state = lambda: setattr(poller, "reason", "ReqNodeNotAvail") or "PENDING"
    poller._update_state(0.0)
    assert "-> PENDING (SLURM's reason: ReqNodeNotAvail)" in capsys.readouterr().err
