"""The rehearsal switch: an experiment's own grid and code path with only sizes shrunk (neuclip/grid/rehearsal.py),
checked cell by cell against the real grid, then run for real: paper.yaml through `snakemake --profile slurm
all` on the test cluster, ablations.yaml locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import neuclip.grid.workflow as wf
from neuclip.grid.experiment import load_experiment
from neuclip.grid.rehearsal import tiny_model

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "workflows" / "configs"
REHEARSAL = CONFIGS / "rehearsal.yaml"

# The keys a rehearsal may change in a cell's train config: sizes, where things are, and labels.
SIZE_KEYS = {
    "run_dir", "model", "data.train_shards", "data.train_num_samples", "data.data_size", "data.workers",
    "train.global_batch_size", "train.max_steps", "train.warmup_steps", "train.checkpoint_every",
    "train.log_every", "train.threads", "error.every", "error.anchors", "error.batch_size", "error.shards",
    "launcher.nodes", "launcher.gpus_per_node", "launcher.cpus_per_task", "launcher.mem_gb",
    "launcher.timeout_min", "meta.experiment", "meta.scale",
}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value and not key.endswith("options"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", ["paper", "ablations", "datacomp"])
def test_only_sizes_shrink(name):
    real = load_experiment([CONFIGS / f"{name}.yaml"], launcher="slurm")
    shrunk = load_experiment([CONFIGS / f"{name}.yaml", REHEARSAL], launcher="slurm")
    real_runs = {(r.dataset, r.method, r.variant): r for r in reversed(wf.runs(real))}  # first seed wins
    shrunk_runs = {(r.dataset, r.method, r.variant): r for r in wf.runs(shrunk)}
    assert set(shrunk_runs) == set(real_runs)  # every data set, method and variant; one seed each
    assert {r.seed for r in shrunk_runs.values()} == {0}
    for cell, run in shrunk_runs.items():
        a, b = flat(wf.train_config(real, real_runs[cell])), flat(wf.train_config(shrunk, run))
        changed = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert changed <= SIZE_KEYS, (cell, {k: (a.get(k), b.get(k)) for k in changed - SIZE_KEYS})
        assert b["model"] == tiny_model(a["model"]) and b["train.max_steps"] == 6
        if a["data.data_size"] > a["data.train_num_samples"]:  # ids beyond the samples present, as for real
            assert b["data.data_size"] > b["data.train_num_samples"]
        assert b["meta.scale"] == "rehearsal" and b["meta.experiment"] == f"{name}_rehearsal"


def test_sampled_cells_cover_every_method_and_every_data_set():
    config = load_experiment([CONFIGS / "paper.yaml", REHEARSAL], rehearsal={"cells": "sample"})
    runs = wf.runs(config)
    assert {r.method for r in runs if r.dataset == "cc3m"} == set(config["methods"])
    assert {r.dataset for r in runs} == set(config["datasets"])
    assert len(runs) == 7 + 5


def test_a_rehearsal_sizes_its_batch_for_the_world_the_site_gives(tmp_path):
    """The rehearsal shrinks each batch to a multiple of the world size the job will start, read from the same
    complete launcher section as the job's: here slurm/site.yaml's GPUs per node, which no resources key sets."""
    from neuclip.grid.preflight import preflight

    site = tmp_path / "site.yaml"
    site.write_text("partition: debug\ngpus_per_node: 3\n")
    config = load_experiment([CONFIGS / "tiny.yaml", REHEARSAL], launcher="slurm", slurm_site=str(site))
    plans = preflight(config)  # the trainer's own geometry check, per cell
    assert plans and {p.world for p in plans} == {3}
    for run in wf.runs(config):
        assert wf.train_config(config, run)["train"]["global_batch_size"] % 3 == 0


def summaries(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in root.glob("**/eval/tiny/summary.json")}


@pytest.mark.slow
def test_ablations_rehearsal_runs_locally(tmp_path):
    from tests.test_pipeline import snakemake

    snakemake(tmp_path, "-c2", "all", "--configfile", str(CONFIGS / "ablations.yaml"), str(REHEARSAL))
    runs = tmp_path / "runs" / "ablations_rehearsal"
    assert len(summaries(runs)) == 12, sorted(summaries(runs))  # the default and the 11 variants
    table = (tmp_path / "results" / "ablations_rehearsal" / "tables" / "ablation_dfn14m_rehearsal.md")
    assert table.is_file(), sorted(p.name for p in table.parent.iterdir())


def watch_status(proc, runs: Path) -> set[tuple[str, bool]]:
    """Poll `neuclip status`'s rows while the driver runs: the (state, has a job id) pairs seen."""
    from neuclip.commands.status import status

    seen: set[tuple[str, bool]] = set()
    while proc.poll() is None:
        if runs.is_dir():
            seen |= {(row.state, row.job.isdigit()) for row in status(runs)}
        time.sleep(5)
    return seen


@pytest.mark.slow
@pytest.mark.slurm
def test_paper_rehearsal_runs_on_the_slurm_cluster(tmp_path, slurm_cluster, monkeypatch):
    """paper.yaml's own grid through `snakemake --profile slurm all`, real sbatch jobs: every method on CC3M
    (RN50's family: tiny-cnn, BatchNorm) and one method on each other data set (cells: sample), to fit CI.
    `neuclip status` watches it meanwhile, as a user would."""
    from tests.test_pipeline import snakemake_command

    sample = tmp_path / "sample.yaml"
    sample.write_text(yaml.safe_dump({"rehearsal": {"cells": "sample"}}))
    work = tmp_path / "work"
    work.mkdir()
    runs = work / "runs" / "paper_rehearsal"
    cmd, env = snakemake_command(work, "--profile", str(REPO / "slurm"), "all", "--configfile",
                                 str(CONFIGS / "paper.yaml"), str(REHEARSAL), str(sample), env=slurm_cluster)
    for key, value in slurm_cluster.items():  # status asks squeue/sacct of the test cluster
        monkeypatch.setenv(key, value)
    log_path = tmp_path / "snakemake.log"
    with open(log_path, "w") as log_file, subprocess.Popen(cmd, env=env, stdout=log_file,
                                                           stderr=subprocess.STDOUT) as proc:
        seen = watch_status(proc, runs)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-6000:]
    jobs = list(runs.glob("*/*/default/seed0/job.json"))
    assert len(jobs) == 12 and all('"slurm"' in j.read_text() for j in jobs), jobs
    assert len(summaries(runs)) == 12
    main = pd.read_csv(work / "results" / "paper_rehearsal" / "tables" / "main.csv")
    assert len(main) >= 7, main
    assert any(state in ("queued", "running") and job for state, job in seen), seen  # seen mid-run, with job ids
    final = subprocess.run([sys.executable, "-m", "neuclip.cli", "status", str(runs)], capture_output=True,
                           text=True, env={**os.environ, **slurm_cluster}, timeout=300).stdout
    assert final.rstrip().endswith("12 cells: 12 done"), final
