"""The whole tiny pipeline through Snakemake: locally, then through `snakemake --profile slurm all` on the
real single-machine SLURM cluster, whose tables must equal the local run's. Also: a finished pipeline
schedules nothing, and deleting one evaluation reruns only that job and the report.

Each pipeline takes a few minutes on 2 CPU cores; both are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
METHODS = ["OpenCLIP", "SigLIP", "SogCLR", "iSogCLR", "FastCLIP-v3", "AmorLIP", "NeuCLIP"]


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
    snakemake(workdir, "-c2", "all", timeout=1800)  # minutes on an idle 2-core machine; far more when loaded
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


def test_rerun_schedules_nothing_and_a_deleted_eval_reruns_alone(local_run):
    out = snakemake(local_run, "-n", "all")
    assert "Nothing to be done" in out, out[-2000:]
    summary = local_run / "runs/tiny/synthetic/fastclip/default/seed0/eval/tiny/summary.json"
    summary.unlink()
    assert scheduled(snakemake(local_run, "-n", "all")) == {"evaluate": 1, "report": 1, "all": 1}


@pytest.mark.slurm
def test_slurm_profile_runs_the_tiny_pipeline_with_the_local_tables(local_run, slurm_cluster, tmp_path):
    out = snakemake(tmp_path, "--profile", str(REPO / "slurm"), "all", env=slurm_cluster, timeout=1500)
    jobs = list((tmp_path / "runs/tiny/synthetic").glob("*/default/seed0/job.json"))
    assert len(jobs) == 7, f"expected 7 SLURM training jobs, found {jobs}\n{out[-2000:]}"
    assert all('"slurm"' in j.read_text() for j in jobs)
    ours = pd.read_csv(tmp_path / "results/tiny/tables/main.csv")
    local = pd.read_csv(local_run / "results/tiny/tables/main.csv")
    pd.testing.assert_frame_equal(ours, local)
