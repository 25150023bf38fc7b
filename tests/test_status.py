"""`neuclip status RUNS_DIR`: a finished, a running, a failed and a not-started cell, built here from a real
short run; and, on the SLURM test cluster, queued / requeued / running / cancelled jobs."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from neuclip.cli import main as cli
from neuclip.commands import status as st

torch.set_num_threads(1)


def _cell(runs: Path, key: str, cfg: dict) -> Path:
    """What the workflow's train_config rule writes for a cell, pointing at runs/<cell>."""
    run_dir = runs / key
    out = runs / "configs" / f"{key}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({**cfg, "run_dir": str(run_dir)}))
    return run_dir


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def runs(finished_run, tmp_path):
    runs = tmp_path / "runs" / "exp"
    cfg = yaml.safe_load((finished_run / "config.yaml").read_text())

    done = _cell(runs, "synthetic/openclip/default/seed0", cfg)
    shutil.copytree(finished_run, done, ignore=shutil.ignore_patterns("checkpoints", "model"))

    running = _cell(runs, "synthetic/fastclip/default/seed0", cfg)
    running.mkdir(parents=True)
    for name in ("config.yaml", "provenance.json"):
        shutil.copy(finished_run / name, running / name)
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    (running / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # a line being written

    failed = _cell(runs, "synthetic/sogclr/default/seed0", cfg)
    failed.mkdir(parents=True)
    for name in ("config.yaml", "provenance.json"):
        shutil.copy(finished_run / name, failed / name)
    (failed / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    logs = tmp_path / "submitit"
    logs.mkdir()
    pid = _dead_pid()
    (failed / "job.json").write_text(json.dumps({"executor": "local", "job_id": str(pid), "folder": str(logs)}))
    (logs / f"{pid}_0_log.err").write_text(
        "neuclip train: resuming at step 2\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nsubmitit ERROR (123): Job failed\n"
    )

    _cell(runs, "synthetic/siglip/default/seed0", cfg)  # config written, nothing started
    return runs, running


def test_one_row_per_cell(runs, capsys):
    runs, running = runs
    with open(running / ".lock", "w") as lock:  # as the trainer holds it (runtime.run_lock)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rows = {r.cell: r for r in st.status(runs)}
        assert cli(["status", str(runs)]) == 0
    table = capsys.readouterr().out
    assert list(rows) == sorted(rows) and len(rows) == 4

    done = rows["synthetic/openclip/default/seed0"]
    steps = yaml.safe_load((running / "config.yaml").read_text())["train"]["max_steps"]  # the shared run's 12
    assert (done.state, done.step, done.total) == ("done", steps, steps)

    run = rows["synthetic/fastclip/default/seed0"]
    last = json.loads((running / "metrics.jsonl").read_text().splitlines()[3])
    assert (run.state, run.step, run.total, run.loss) == ("running", 4, steps, last["loss"])
    assert run.eta_s == pytest.approx((steps - 4) * 16 / last["samples_per_s"])

    bad = rows["synthetic/sogclr/default/seed0"]
    assert bad.state == "failed" and bad.step == 2 and bad.job
    assert bad.error == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"

    assert rows["synthetic/siglip/default/seed0"].state == "not started"
    assert "4 cells: 1 done, 1 failed, 1 not started, 1 running" in table
    assert "synthetic/fastclip/default/seed0  running" in table and f"4/{steps}" in table
    # without the lock (the trainer died) the same folder reads as failed
    assert {r.cell: r.state for r in st.status(runs)}["synthetic/fastclip/default/seed0"] == "failed"


def test_watch_refreshes_until_interrupted(runs, monkeypatch, capsys):
    runs, _ = runs
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(st.time, "sleep", sleep)
    assert cli(["status", str(runs), "--watch", "0.5"]) == 0
    assert naps == [0.5, 0.5] and capsys.readouterr().out.count("4 cells:") == 2


def test_not_a_runs_folder(tmp_path, capsys):
    assert cli(["status", str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_states(slurm_cluster, runs, tmp_path):
    """Real jobs on the test cluster: held -> queued, held after an attempt -> requeued, released -> running,
    cancelled -> failed (CANCELLED from sacct)."""
    runs, _ = runs
    cell = "synthetic/siglip/default/seed0"
    run_dir = runs / cell
    run_dir.mkdir(parents=True)
    name = "neuclip-status-test"
    out = subprocess.run(["sbatch", "--parsable", "--hold", "-J", name, "-o", str(tmp_path / "%j.out"),
                          "--wrap", "sleep 120"], capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    job = out.stdout.strip().split(";")[0]
    try:
        (run_dir / "job.json").write_text(json.dumps({"executor": "slurm", "job_id": job, "job_name": name,
                                                      "folder": str(tmp_path)}))  # fmt: skip

        def state():
            row = {r.cell: r for r in st.status(runs)}[cell]
            assert row.job == job
            return row.state

        assert state() == "queued"
        shutil.copy(runs / "synthetic/openclip/default/seed0/provenance.json", run_dir)  # an attempt ran before
        assert state() == "requeued"
        subprocess.run(["scontrol", "release", job], check=True, timeout=30)
        deadline = time.monotonic() + 60
        while state() != "running":
            assert time.monotonic() < deadline, "the released job never ran"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    deadline = time.monotonic() + 60
    while True:
        row = {r.cell: r for r in st.status(runs)}[cell]
        if row.state == "failed" and row.notes:
            break
        assert time.monotonic() < deadline, f"still {row.state} {row.notes} after scancel"
        time.sleep(0.5)
    assert row.notes == ["CANCELLED"]


def test_a_relative_run_dir_is_the_cell_folder_under_runs_dir(tmp_path, monkeypatch):
    """The workflow writes run_dir relative to Snakemake's working directory; status run elsewhere finds it."""
    runs = tmp_path / "work" / "runs" / "exp"
    key = "synthetic/openclip/default/seed0"
    (runs / "configs" / "synthetic/openclip/default").mkdir(parents=True)
    (runs / "configs" / f"{key}.yaml").write_text(yaml.safe_dump({"run_dir": f"runs/exp/{key}"}))
    (runs / key).mkdir(parents=True)
    (runs / key / "done.json").write_text("{}")
    monkeypatch.chdir(tmp_path)  # not the working directory the run_dir is relative to
    assert st.cells(runs) == {key: runs / key}
    assert [row.state for row in st.status(runs)] == ["done"]
