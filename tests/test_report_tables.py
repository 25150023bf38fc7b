"""Report table builders on hand-made runs: paper-scale ablations beside the published ones, scale guards."""

from __future__ import annotations

from pathlib import Path

import yaml

from neuclip.report import expect, tables
from neuclip.report.loading import Run, method_label
from neuclip.report.table import Stat

PUBLISHED = yaml.safe_load((Path(__file__).parents[1] / "results" / "published.yaml").read_text())


def run(dataset, scale, method, variant, seed, dc38, options=None, experiment="e"):
    return Run(
        path=f"{experiment}/{dataset}/{method}/{variant}/seed{seed}",
        abspath=Path("/nowhere"),
        experiment=experiment,
        dataset=dataset,
        scale=scale,
        method=method_label(method, options),
        method_name=method,
        options=options or {},
        variant=variant,
        seed=seed,
        config_hash="h",
        git_commit="c",
        git_dirty=False,
        packages={},
        hostname=None,
        command=None,
        groups={"datacomp38": dc38},
    )


def test_paper_ablation_beside_published_with_aliases():
    runs = [run("dfn14m", "paper", "neuclip", "default", s, v) for s, v in ((0, 0.391), (1, 0.393))]
    runs += [run("dfn14m", "paper", "neuclip", "T_r=0", s, v) for s, v in ((0, 0.385), (1, 0.387))]
    missing, skipped = [], []
    (table,) = tables.ablation_tables(runs, expect.from_runs(runs), PUBLISHED, missing, skipped)
    assert table.name == "ablation_dfn14m_paper"
    assert table.columns[:4] == ["DataComp-38 avg ours", "Δ vs default", "published", "published Δ vs default"]
    assert table.cell("NeuCLIP: default", "published").value == 39.16
    assert table.cell("NeuCLIP: T_r=0", "published").value == 38.48  # T_r=0 (never restart) = the paper's T_r=inf
    assert table.cell("NeuCLIP: T_r=0", "published Δ vs default").text() == "-0.68"
    assert table.cell("NeuCLIP: T_r=0", "Δ vs default").text() == "-0.60"
    assert table.cell("NeuCLIP: T_r=0", "DataComp-38 avg ours").text() == "38.60 ± 0.14 (n=2)"
    assert {m.suite for m in missing} == {"imagenet_variants", "retrieval"}  # paper scale expects all groups


def test_small_scale_cc3m_never_gets_published_columns():
    runs = [run("cc3m", "small", "neuclip", "default", 0, 0.10), run("cc3m", "paper", "neuclip", "default", 0, 0.25)]
    missing, skipped = [], []
    table = tables.method_table(tables.SPECS[0], runs, expect.from_runs(runs), PUBLISHED, missing, skipped)
    assert table.columns == [
        "CC3M [paper scale] ours",
        "CC3M [paper scale] published",
        "CC3M [paper scale] Δ",
        "CC3M [small scale] ours",
    ]
    paper, small = table.cell("NeuCLIP", "CC3M [paper scale] ours"), table.cell("NeuCLIP", "CC3M [small scale] ours")
    assert isinstance(paper, Stat) and paper.runs == ["e/cc3m/neuclip/default/seed0"] and paper.mean == 25.0
    assert small.mean == 10.0
    # a paper-scale run without DataComp results never falls back to the tiny stand-in
    runs = [run("cc3m", "paper", "neuclip", "default", 0, None)]
    runs[0].groups = {"tiny": 0.5}
    table = tables.method_table(tables.SPECS[0], runs, expect.from_runs(runs), PUBLISHED, missing, skipped)
    assert table.cell("NeuCLIP", "CC3M [paper scale] ours").text() == "—" and len(missing) == 1


def test_method_labels():
    assert method_label("fastclip", {}) == "FastCLIP-v3"
    assert method_label("fastclip", {"version": "v1"}) == "FastCLIP-v1"
    assert method_label("isogclr", {"gamma_schedule": "cosine"}) == "FastCLIP-v2"
    assert method_label("isogclr", {}) == "iSogCLR"
