"""Every stage through the one launcher (neuclip/jobs/launch.py): `neuclip eval`, `neuclip error run` and `neuclip error
sweep --launcher YAML` run as submitit jobs in their output folder, with the same results as in-process; an
evaluation job requeued mid-suite resumes past its finished tasks; a live job of any stage is re-attached to;
the launcher section is neuclip/grid/launcher.yaml's (one table), old spellings refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from neuclip.train.testing import tiny_config, train_pattern

REPO = Path(__file__).resolve().parents[1]
LOCAL = "{executor: local, timeout_min: 5}"


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    """A finished 6-step fastclip run labelled as a grid cell."""
    from neuclip.error_study.tracking import train

    torch.set_num_threads(1)
    meta = {"experiment": f"st{os.getpid()}", "dataset": "synthetic", "method": "fastclip", "variant": "default",
            "seed": 0}
    cfg = tiny_config(tmp_path_factory.mktemp("stage") / "run", train_pattern(synth_data),
                      **{"method.name": "fastclip", "train.max_steps": 6, "meta": meta})
    train(cfg)
    return Path(cfg["run_dir"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuclip.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def _values(summary: dict) -> dict:
    return {task: entry["value"] for task, entry in summary["tasks"].items()}


@pytest.mark.slow  # submitit local jobs
def test_eval_job_equals_in_process_and_names_its_cell(trained, synth_data, tmp_path):
    from neuclip.eval.runner import evaluate_suite
    from neuclip.jobs.records import job_name

    here = evaluate_suite(trained / "model", "tiny", synth_data, tmp_path / "here", batch_size=16, workers=0,
                          progress=False)
    out = tmp_path / "job"
    r = _cli("eval", "--model-dir", str(trained / "model"), "--suite", "tiny", "--data-root", str(synth_data),
             "--out", str(out), "--batch-size", "16", "--workers", "0", "--launcher", LOCAL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "submitted local job" in r.stderr
    assert _values(json.loads((out / "summary.json").read_text())) == _values(here)
    record = json.loads((out / "job.json").read_text())
    assert record["kind"] == "eval" and record["executor"] == "local"
    meta = yaml.safe_load((trained / "config.yaml").read_text())["meta"]
    assert record["job_name"] == job_name({"meta": {**meta, "stage": "eval", "suite": "tiny"}, "run_dir": str(out)})
    assert record["job_name"].endswith(".synthetic.fastclip.s0.eval-tiny")

    # A driver that died after the job wrote summary.json: Snakemake's rerun deletes it, the re-attached job
    # does not write it again; the launcher restores it from the job's result.
    import submitit

    from neuclip.jobs.stages import restore_output

    written = (out / "summary.json").read_text()
    (out / "summary.json").unlink()
    job = submitit.LocalJob(folder=Path(record["folder"]), job_id=record["job_id"])
    assert restore_output("eval", {"run_dir": str(out)}, job) == 0
    assert (out / "summary.json").read_text() == written

    # The same work asked again (a rerun after the driver died while the job finished): no second job, the
    # output restored from the finished job's result; a changed run setting (batch size) is the same work.
    (out / "summary.json").unlink()
    again = ["eval", "--model-dir", str(trained / "model"), "--suite", "tiny", "--data-root", str(synth_data),
             "--out", str(out), "--workers", "0", "--launcher", LOCAL]
    r = _cli(*again, "--batch-size", "8")
    assert r.returncode == 0 and "already did this work" in r.stderr and "submitted" not in r.stderr, r.stderr
    assert (out / "summary.json").read_text() == written
    assert json.loads((out / "job.json").read_text())["job_id"] == record["job_id"]
    # other work (another precision) is a new job
    r = _cli(*again, "--batch-size", "16", "--precision", "fp32")
    assert r.returncode == 0 and "submitted local job" in r.stderr, r.stderr[-3000:]
    assert json.loads((out / "job.json").read_text())["job_id"] != record["job_id"]


@pytest.mark.slow  # submitit local jobs
def test_error_run_job_writes_the_in_process_row(trained, tmp_path):
    from neuclip.error_study.run_error import score_run

    r = _cli("error", "run", str(trained), "--anchors", "16", "--launcher", LOCAL)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((trained / "error" / "error.json").read_text())
    assert json.loads((trained / "error" / "job.json").read_text())["kind"] == "error-run"
    again = score_run(trained, anchors=16)
    assert {k: v for k, v in row.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}


@pytest.mark.slow
def test_an_eval_job_requeued_mid_suite_keeps_its_finished_tasks(trained, synth_data, tmp_path):
    """USR2 (what a time limit sends) once the first task file exists: submitit requeues, the next attempt
    skips that task (its file is not rewritten) and finishes the others."""
    from neuclip.eval.suites import suite_tasks
    from neuclip.jobs import launch

    out = tmp_path / "requeued"
    work = {"model_dir": str(trained / "model"), "suite": "tiny", "data_root": str(synth_data), "batch_size": 1,
            "workers": 0, "device": None, "precision": "datacomp"}
    la = launch.parse_launcher("{executor: local, timeout_min: 5, max_num_timeout: 3}")
    cfg = {"run_dir": str(out), "launcher": la, "meta": {}, "args": work}
    out.mkdir()
    job = launch.submit(cfg, kind="eval")
    assert launch.submit(cfg, kind="eval").job_id == job.job_id  # a live job is re-attached to
    waited = {}
    waiter = threading.Thread(target=lambda: waited.update(rc=launch.wait(job, out, label="neuclip eval")))
    waiter.start()
    first = out / f"{suite_tasks('tiny')[0].id}.json"
    deadline = time.time() + 300
    while not first.exists():
        assert waiter.is_alive() and time.time() < deadline, "the first task never finished"
        time.sleep(0.02)
    stamp = first.stat().st_mtime_ns
    attempts = json.loads((out / "provenance.json").read_text())["attempts"]
    os.kill(attempts[0]["pid"], signal.SIGUSR2)
    waiter.join(timeout=300)
    assert waited.get("rc") == 0, f"see {job.paths.folder}"
    attempts = json.loads((out / "provenance.json").read_text())["attempts"]
    assert len(attempts) == 2, attempts  # requeued once
    assert first.stat().st_mtime_ns == stamp  # finished before the requeue: kept, not recomputed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {t.id for t in suite_tasks("tiny")}


def test_stage_launchers_follow_one_precedence_and_one_spelling():
    import neuclip.grid.workflow as wf
    from neuclip.train.config import ConfigError

    config = {
        "experiment": "x", "launcher": "slurm", "slurm_site": "slurm/site.yaml", "datasets": ["cc3m"],
        "resources": {"nodes": 2, "gpus_per_node": 4, "mem_gb": 100, "timeout_min": 600},
        "per_dataset": {"cc3m": {"resources": {"mem_gb": 200}}},
        "stages": {"eval": {"timeout_min": 60}, "error_sweep": {"mem_gb": 8}},
        "error_study": {"jobs": 3},
    }
    train = wf.stage_launcher(config, "train", "cc3m")
    assert (train["nodes"], train["gpus_per_node"], train["mem_gb"], train["timeout_min"]) == (2, 4, 200, 600)
    ev = wf.stage_launcher(config, "eval", "cc3m")  # its shape (1 GPU, 1 task) over per_dataset, its own limit
    assert (ev["nodes"], ev["gpus_per_node"], ev["tasks_per_node"], ev["mem_gb"], ev["timeout_min"]) == (
        1, 1, 1, 200, 60)
    sweep = wf.stage_launcher(config, "error_sweep")
    assert (sweep["gpus_per_node"], sweep["cpus_per_task"], sweep["mem_gb"]) == (0, 3, 8)  # CPU only
    assert wf.stage_launcher(config, "error_run", "cc3m")["gpus_per_node"] == 4  # the cell's allocation
    assert all(la["executor"] == "slurm" and la["site"].endswith("slurm/site.yaml") for la in (train, ev, sweep))
    # the launcher completes a stage's section with the site's defaults (lowest): partition from the site
    from neuclip.jobs.launch import parse_launcher

    assert parse_launcher(wf._flow(ev))["partition"] == "debug"
    for bad, new in (({"time_min": 5}, "timeout_min"), ({"additional_parameters": {}}, "slurm_additional_parameters")):
        with pytest.raises(ConfigError, match=f"is now '{new}'"):
            parse_launcher(yaml.safe_dump(bad, default_flow_style=True))
        with pytest.raises(ConfigError, match=f"is now '{new}'"):
            wf.validate_config({**config, "stages": {"eval": bad}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_launcher("{gpus: 1}")


def test_a_stage_that_runs_as_one_task_refuses_several():
    from neuclip.jobs.launch import make_executor, parse_launcher
    from neuclip.train.config import ConfigError

    cfg = {"run_dir": "/tmp/x", "launcher": parse_launcher("{executor: slurm, gpus_per_node: 2}"), "meta": {}}
    with pytest.raises(ConfigError, match="tasks_per_node: 1"):
        make_executor(cfg, "eval")


def test_a_run_of_another_identity_is_moved_aside_only_when_asked(synth_data, tmp_path):
    """What the train rule does when a changed identity key (a method option) reruns a finished cell."""
    from neuclip.jobs import launch
    from neuclip.train.config import ConfigError

    root = tmp_path / "runs" / "exp"
    meta = {"experiment": "exp", "dataset": "synthetic", "method": "fastclip", "variant": "default", "seed": 0}
    common = {"method.name": "fastclip", "train.max_steps": 2, "meta": meta}
    pattern = train_pattern(synth_data)
    run = root / "synthetic" / "fastclip" / "default" / "seed0"
    assert launch.launch(tiny_config(run, pattern, **common)) == 0
    changed = tiny_config(run, pattern, **common, **{"method.options": {"gamma": 0.5}})
    (run / "done.json").unlink()  # what Snakemake does before it reruns the cell
    with pytest.raises(ConfigError, match="different config"):
        launch.launch(changed)  # by hand: refused, nothing moved
    assert launch.launch(changed, supersede=True) == 0
    moved = list((tmp_path / "runs" / "exp.superseded").glob("*/synthetic/fastclip/default/seed0"))
    assert len(moved) == 1 and (moved[0] / "model").is_dir()  # the old run, whole
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["options"] == {"gamma": 0.5}
    assert (run / "done.json").exists()
    assert launch.launch(changed, supersede=True) == 0 and len(list((tmp_path / "runs").iterdir())) == 2  # same id


def test_the_work_key_covers_arguments_inputs_and_code_but_not_settings(trained, monkeypatch):
    """What a finished stage job may be reused for (neuclip/jobs/stages.py): the same arguments but run settings,
    the same input files (name, size, mtime), the same code."""
    from neuclip.jobs import stages

    args = {"run": str(trained), "anchors": 16, "shards": None, "batch_size": 8}
    key = stages.work_key("error-run", {"args": args})
    assert key == stages.work_key("error-run", {"args": {**args, "batch_size": 64}})  # a run setting
    assert key != stages.work_key("error-run", {"args": {**args, "anchors": 32}})
    newest = sorted((trained / "checkpoints").iterdir())[-1]
    os.utime(newest, ns=(newest.stat().st_atime_ns, newest.stat().st_mtime_ns + 1))  # a rewritten checkpoint
    assert key != stages.work_key("error-run", {"args": args})
    key = stages.work_key("error-run", {"args": args})
    monkeypatch.setattr(stages, "code_fingerprint", lambda: "other code")
    assert key != stages.work_key("error-run", {"args": args})
    assert stages.work_key("eval", {"args": {"model_dir": str(trained / "model"), "redo": True}}) is None
