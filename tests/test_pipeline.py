"""The whole tiny pipeline through Snakemake: locally, then through `snakemake --profile slurm all` on the
real single-machine SLURM cluster, where every train, eval and error rule is a SLURM job (none runs on the
host) and whose tables must equal the local run's; its driver is killed while an evaluation job runs and a
restart re-attaches to that job (one SLURM job per rule). Also: a finished pipeline schedules nothing, not
after a change of run settings (resources, a log interval, the eval batch size, loader workers, the SLURM
profile's launcher) either; a changed method option reruns that cell and what depends on it; deleting one
evaluation reruns only that job and the report.

Each pipeline takes a few minutes on 2 CPU cores; both are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from submitit.core.utils import JobPaths

from neuclip.jobs.records import scontrol_job

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
METHODS = ["OpenCLIP", "SigLIP", "SogCLR", "iSogCLR", "FastCLIP-v3", "AmorLIP", "NeuCLIP"]
TINY = REPO / "workflows" / "configs" / "tiny.yaml"
# `all` and each run's own error pass (the `error_study` target): every train, eval and error rule
TARGETS = ("all", "error_study")


def snakemake_command(workdir: Path, *args: str, env: dict | None = None) -> tuple[list[str], dict]:
    """The snakemake command line on the repo's Snakefile with `workdir` as working directory, and its env."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    return cmd, {**os.environ, "PATH": path, **(env or {})}


def snakemake(workdir: Path, *args: str, env: dict | None = None, timeout: int = 900) -> str:
    """Run snakemake on the repo's Snakefile with `workdir` as working directory; return its output."""
    cmd, full_env = snakemake_command(workdir, *args, env=env)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def scheduled(dry_run_output: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", dry_run_output, re.M) if m[0] != "total"}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny-local")
    snakemake(workdir, "-c2", *TARGETS, timeout=1800)  # minutes on an idle 2-core machine; far more when loaded
    return workdir


def test_tiny_pipeline_produces_every_table_and_plot(local_run):
    results = local_run / "results" / "tiny"
    for table in ("main", "retrieval", "stress", "runs", "fastclip_comparison"):
        for ext in ("csv", "md", "tex", "provenance.json"):
            assert (results / "tables" / f"{table}.{ext}").is_file(), f"{table}.{ext}"
    for plot in ("error_vs_ratio", "error_over_steps", "training_synthetic_tiny", "error_training_synthetic_tiny"):
        assert (results / "plots" / f"{plot}.png").is_file() and (results / "plots" / f"{plot}.pdf").is_file()
    main = (results / "tables" / "main.md").read_text()
    rows = [line for line in main.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == METHODS, main
    assert not any("—" in row for row in rows), main  # every cell filled
    # every method learns: zero-shot colour at least twice chance (8 colours: 0.125), AmorLIP and SigLIP included
    for summary in sorted(local_run.glob("runs/tiny/synthetic/*/default/seed0/eval/tiny/summary.json")):
        colour = json.loads(summary.read_text())["tasks"]["synth_colour"]["value"]
        assert colour >= 2 * 0.125, f"{summary.parts[-6]}: colour {colour:.3f} < 2 x chance"
    assert len(list(local_run.glob("runs/tiny/synthetic/*/default/seed0/eval/tiny/summary.json"))) == 7
    assert "Nothing is missing" in (results / "tables" / "missing.md").read_text()
    # error tracked during training (error_tracking.every = 48 of 192 steps) for every method with an estimate
    curves = pd.read_csv(results / "tables" / "error_curves.csv")
    assert set(curves["method"]) == {"openclip", "sogclr", "fastclip", "amorlip", "neuclip"}
    assert all(sorted(part["step"]) == [48, 96, 144, 192] for _, part in curves.groupby("method"))
    assert (curves["n"] == 4096).all() and (curves["mse_log"] >= 0).all()


def test_rerun_schedules_only_what_a_changed_identity_needs(local_run, tmp_path):
    out = snakemake(local_run, "-n", *TARGETS)
    assert "Nothing to be done" in out, out[-2000:]
    # run settings are no identity: resources, a log interval, the eval batch size, loader workers, and the
    # launcher the SLURM profile sets (launcher=slurm, slurm_site) schedule nothing
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"resources": {"mem_gb": 3}, "train": {"log_every": 7},
                                        "eval": {"batch_size": 128}, "data_loader": {"workers": 1}}))
    out = snakemake(local_run, "-n", *TARGETS, "--configfile", str(TINY), str(settings))
    assert "Nothing to be done" in out, out[-3000:]
    out = snakemake(local_run, "--profile", str(REPO / "slurm"), "-n", *TARGETS)
    assert "Nothing to be done" in out, out[-3000:]
    # a method option is: that cell and what depends on it (its eval, its error pass, the report)
    option = tmp_path / "option.yaml"
    option.write_text(yaml.safe_dump({"method_options": {"neuclip": {"restart_every": 40}}}))
    out = snakemake(local_run, "-n", "-p", *TARGETS, "--configfile", str(TINY), str(option))
    assert scheduled(out) == {"train_config": 1, "train": 1, "evaluate": 1, "error_run": 1, "report": 1, "all": 1,
                              "error_study": 1}, out[-3000:]
    outputs = re.findall(r"^\s+output: (\S+)", out, re.M)
    assert all("synthetic/neuclip/" in o for o in outputs if "/synthetic/" in o), outputs
    assert "runs/tiny/synthetic/neuclip/default/seed0/done.json" in outputs, outputs


def test_a_deleted_eval_reruns_alone(local_run):
    summary = local_run / "runs/tiny/synthetic/fastclip/default/seed0/eval/tiny/summary.json"
    summary.unlink()
    assert scheduled(snakemake(local_run, "-n", "all")) == {"evaluate": 1, "report": 1, "all": 1}


def _until(what: str, cond, timeout: float = 900, every: float = 0.2):
    deadline = time.time() + timeout
    while not (value := cond()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


def _job_records(runs: Path) -> list[dict]:
    """Every stage's job.json: RUN/job.json (train), RUN/eval/SUITE/, RUN/error/, error_study/."""
    return [json.loads(p.read_text()) for p in sorted(runs.rglob("job.json"))]


def _sacct(*args: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", *args], capture_output=True, text=True, check=True, timeout=60)
    return [line.split("|") for line in out.stdout.split()]


def _frames(results: Path) -> dict[str, pd.DataFrame]:
    """Every table the report writes, without the columns that are timings or paths (they differ by nature) and
    the config hash (of the whole config.yaml, whose launcher section, a run setting, differs by design)."""
    varying = re.compile(r"seconds|wall|samples_per|_s$|time|path|dir|host|created|config hash")
    out = {}
    for csv in sorted((results / "tables").glob("*.csv")):
        frame = pd.read_csv(csv)
        out[csv.name] = frame[[c for c in frame.columns if not varying.search(str(c))]]
    return out


@pytest.mark.slurm
def test_slurm_profile_runs_every_stage_as_a_job_with_the_local_tables(local_run, slurm_cluster, tmp_path):
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    runs = tmp_path / "runs" / "tiny"
    cmd, env = snakemake_command(tmp_path, "--profile", str(REPO / "slurm"), *TARGETS, env=slurm_cluster)
    log = tmp_path / "driver.log"
    drivers = []
    try:
        with open(log, "w") as out:
            drivers.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
        # The first evaluation job: once it runs, hold it there (SUSPENDED is alive) and kill the driver.
        record = _until("an evaluation job",
                        lambda: next(iter(runs.glob("synthetic/*/default/seed0/eval/tiny/job.json")), None))
        job = json.loads(record.read_text())
        state = lambda: (scontrol_job(job["job_id"]) or {}).get("JobState")  # noqa: E731
        _until(f"eval job {job['job_id']} to run", lambda: state() == "RUNNING", every=0.1)
        # Suspend only once srun has launched the step's task (submitit's first log line, on the task's stdout,
        # comes from it): a job suspended before that launch fails on resume with "Job credential expired"
        # (cred_expire is 10 s here)
        task_log = JobPaths(job["folder"], job["job_id"]).stdout
        _until(f"eval job {job['job_id']}'s task to start",
               lambda: task_log.exists() and "Starting with" in task_log.read_text(errors="replace"), every=0.05)
        subprocess.run(["scontrol", "suspend", job["job_id"]], check=True, timeout=30, env=env)
        drivers[0].kill()
        drivers[0].wait()
        snakemake(tmp_path, "--profile", str(REPO / "slurm"), "--unlock", env=slurm_cluster)
        with open(log, "a") as out:
            drivers.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
        eval_log = runs / "logs/eval" / record.relative_to(runs).parent.parent.parent / "tiny.log"
        _until("the restarted driver to re-attach to the eval job",
               lambda: eval_log.exists() and f"re-attaching to job {job['job_id']}" in eval_log.read_text())
        subprocess.run(["scontrol", "resume", job["job_id"]], check=True, timeout=30, env=env)
        assert drivers[1].wait(timeout=1800) == 0, log.read_text()[-6000:]
    finally:
        for driver in drivers:
            driver.kill()
        for r in _job_records(runs):  # a failed test leaves no job behind on the shared test cluster
            subprocess.run(["scancel", r["job_id"]], timeout=30, env=env)

    # every train, eval and error rule ran as a SLURM job, exactly one per rule, none on this host
    records = _job_records(runs)
    assert Counter(r["kind"] for r in records) == {"train": 7, "eval": 7, "error-run": 5, "error-sweep": 1}, records
    assert all(r["executor"] == "slurm" for r in records)
    names = [r["job_name"] for r in records]
    assert len(set(names)) == len(names) and "tiny.error_sweep" in names, names
    for r in records:
        jobs = _sacct("-S", since, f"--name={r['job_name']}", "-o", "JobID,State")
        assert jobs == [[r["job_id"], "COMPLETED"]], (r["job_name"], jobs)
    # the tables, each run's error pass and the sweep's errors equal the local run's
    ours, local = _frames(tmp_path / "results/tiny"), _frames(local_run / "results/tiny")
    assert set(ours) == set(local) and "main.csv" in ours
    for name in ours:
        pd.testing.assert_frame_equal(ours[name], local[name], obj=name)
    for path in sorted(runs.glob("synthetic/*/default/seed0/error/error.json")):
        there = local_run / path.relative_to(tmp_path)
        a, b = json.loads(path.read_text()), json.loads(there.read_text())
        assert {k: v for k, v in a.items() if k not in ("run", "seconds")} == {
            k: v for k, v in b.items() if k not in ("run", "seconds")}, path
    sweep = {k: pd.read_csv(d / "runs/tiny/error_study/errors.csv")
             for k, d in (("slurm", tmp_path), ("local", local_run))}
    keep = [c for c in sweep["local"].columns if not re.search(r"seconds|wall|cpu", c)]
    pd.testing.assert_frame_equal(sweep["slurm"][keep], sweep["local"][keep])
