"""`neuclip report` on the fixture runs root (tests/fixtures/report/runs, see make_fixtures.py there).

The fixture holds a tiny-scale "synthetic" experiment (4 methods x 2 seeds, an ablation, an error study, one run
never evaluated), a paper-scale cc3m experiment (3 methods x 3 seeds, NeuCLIP seed 2 missing, an unfinished
AmorLIP folder) and a paper-scale FastCLIP-paper comparison (SogCLR; FastCLIP-v1 evaluated on ImageNet only).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from neuclip.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "report" / "runs"
CC3M = "CC3M [paper scale]"
SYNTH = "synthetic [tiny scale] (tiny-suite avg, stand-in)"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "results"
    assert main(["report", "--runs", str(FIXTURE), "--out", str(out)]) == 0
    return out


def md_rows(path: Path) -> dict[str, list[str]]:
    """Markdown table -> {first cell: [cells]} (header row included under its first cell)."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("|") and not line.startswith("|:"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def prov(out: Path, table: str) -> dict:
    return json.loads((out / "tables" / f"{table}.provenance.json").read_text())


def cell(p: dict, row: str, column: str) -> dict:
    return next(c for c in p["cells"] if c["row"] == row and c["column"] == column)


def test_main_table_shape_and_values(out):
    csv = pd.read_csv(out / "tables" / "main.csv").set_index("method")
    assert list(csv.index) == ["OpenCLIP", "SogCLR", "FastCLIP-v1", "FastCLIP-v3", "NeuCLIP"]
    assert list(csv.columns) == [
        f"{CC3M} ours mean",
        f"{CC3M} ours std",
        f"{CC3M} ours n",
        f"{CC3M} published",
        f"{CC3M} Δ",
        f"{SYNTH} ours mean",
        f"{SYNTH} ours std",
        f"{SYNTH} ours n",
    ]
    # OpenCLIP on CC3M: 21.8, 21.9, 22.0 -> 21.90 ± 0.10 (sample std), published 21.84
    row = csv.loc["OpenCLIP"]
    assert row[f"{CC3M} ours mean"] == pytest.approx(21.9)
    assert row[f"{CC3M} ours std"] == pytest.approx(0.1, abs=1e-5)
    assert row[f"{CC3M} ours n"] == 3
    assert row[f"{CC3M} published"] == 21.84
    assert row[f"{CC3M} Δ"] == pytest.approx(0.06, abs=1e-5)
    # FastCLIP-v3: 24.6, 24.7, 24.9 -> mean 24.7333, std sqrt(((-.1333)^2 + (-.0333)^2 + .1667^2) / 2) = 0.1528
    fc = [24.6, 24.7, 24.9]
    std = math.sqrt(sum((v - sum(fc) / 3) ** 2 for v in fc) / 2)
    assert csv.loc["FastCLIP-v3", f"{CC3M} ours std"] == pytest.approx(std, abs=1e-5)
    md = md_rows(out / "tables" / "main.md")
    head = md["method"]
    assert md["FastCLIP-v3"][head.index(f"{CC3M} ours")] == "24.73 ± 0.15 (n=3)"
    assert md["FastCLIP-v3"][head.index(f"{CC3M} published")] == "24.74"
    assert md["FastCLIP-v3"][head.index(f"{CC3M} Δ")] == "-0.01"
    # NeuCLIP: seeds 0, 1 of 3 (seed 2 was never run): 25.0, 25.2 -> 25.10 ± 0.14, n=2/3
    assert md["NeuCLIP"][head.index(f"{CC3M} ours")] == "25.10 ± 0.14 (n=2/3)"
    assert md["NeuCLIP"][head.index(f"{CC3M} Δ")] == "+0.02"
    # the paper's table has no SogCLR row: not reported, not missing
    assert md["SogCLR"][head.index(f"{CC3M} published")] == "n/r"
    # tiny scale: the tiny-suite average stands in, labelled as such
    assert md["OpenCLIP"][head.index(f"{SYNTH} ours")] == "41.00 ± 1.41 (n=2)"
    assert md["SogCLR"][head.index(f"{SYNTH} ours")] == "44.00 (n=1/2)"
    assert md["FastCLIP-v1"][head.index(f"{SYNTH} ours")] == "n/a"  # not in that experiment's grid


def test_missing_cells_are_dashes_and_listed(out):
    md = md_rows(out / "tables" / "main.md")
    head = md["method"]
    assert md["FastCLIP-v1"][head.index(f"{CC3M} ours")] == "—"  # run done, DataComp never evaluated
    assert md["FastCLIP-v1"][head.index(f"{CC3M} Δ")] == "n/r"  # the NeuCLIP paper has no FastCLIP-v1 row
    assert md["NeuCLIP"][head.index(f"{CC3M} ours")].endswith("(n=2/3)")  # a missing seed
    assert "—" in (out / "tables" / "main.tex").read_text().replace("---", "—")
    missing = (out / "tables" / "missing.md").read_text()
    assert "**FastCLIP-v1 / CC3M [paper scale] ours**" in missing
    assert "run `fastclip_cmp/cc3m/fastclip/default/seed0` is done but has no `datacomp38` result" in missing
    assert "NeuCLIP on CC3M [paper], variant default, seed 2: no finished training run" in missing
    assert str(FIXTURE / "paper/cc3m/neuclip/default/seed2") in missing  # the folder that would hold it
    assert "--suite tiny" in missing and "tiny/synthetic/sogclr/default/seed1" in missing
    assert str(FIXTURE / "paper/cc3m/amorlip/default/seed0") in missing  # unfinished folder
    assert "synthetic [tiny scale]: no run evaluated ImageNet" in missing  # column not shown, and why


def test_scale_labels_keep_synthetic_out_of_paper_columns(out):
    for table in ("main", "imagenet_variants", "retrieval", "fastclip_comparison"):
        p = prov(out, table)
        cols = {c["column"] for c in p["cells"]}
        assert all("[tiny scale]" in c or "[paper scale]" in c for c in cols), cols
        assert not any("synthetic" in c and ("published" in c or "Δ" in c) for c in cols)
        assert not any(c.startswith("CC3M") and "tiny" in c for c in cols)
        for c in p["cells"]:
            want = "paper" if "[paper scale]" in c["column"] else "tiny"
            assert {p["runs"][r]["scale"] for r in c.get("runs", [])} <= {want}, c
            if want == "paper":
                assert all(r.split("/")[1] == "cc3m" for r in c.get("runs", [])), c


def test_provenance_names_the_runs(out):
    for name in (
        "main",
        "imagenet_variants",
        "retrieval",
        "fastclip_comparison",
        "ablation_synthetic_tiny",
        "stress",
        "runs",
    ):
        for ext in ("csv", "md", "tex", "provenance.json"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0, (name, ext)
    p = prov(out, "main")
    c = cell(p, "NeuCLIP", f"{CC3M} ours")
    assert c["runs"] == ["paper/cc3m/neuclip/default/seed0", "paper/cc3m/neuclip/default/seed1"]
    assert c["values_percent"] == pytest.approx([25.0, 25.2])
    run = p["runs"]["paper/cc3m/neuclip/default/seed1"]
    config = FIXTURE / "paper/cc3m/neuclip/default/seed1/config.yaml"
    assert run["config_hash"] == hashlib.sha256(config.read_bytes()).hexdigest()  # computed: trainer form
    assert run["git_commit"].startswith("0123456789") and run["git_dirty"] is True
    assert run["seed"] == 1 and run["packages"]["torch"] == "2.14.1"
    assert run["eval_summaries"] == ["paper/cc3m/neuclip/default/seed1/eval/datacomp38/summary.json"]
    tiny = p["runs"]["tiny/synthetic/openclip/default/seed0"]
    assert (
        tiny["config_hash"]
        == json.loads((FIXTURE / "tiny/synthetic/openclip/default/seed0/provenance.json").read_text())["config_hash"]
    )
    pub = cell(p, "NeuCLIP", f"{CC3M} published")
    assert pub["value"] == 25.08 and pub["sources"][0]["published"] == "datacomp38.values.NeuCLIP.cc3m"
    stress = prov(out, "stress")
    assert cell(stress, "NeuCLIP", "batch halved: error ratio")["sources"][0]["file"] == "tiny/error_study/stress.csv"


def test_fastclip_comparison(out):
    md = md_rows(out / "tables" / "fastclip_comparison.md")
    head = md["method"]
    assert [r for r in md if r != "method"] == ["SogCLR", "FastCLIP-v1", "gain FastCLIP-v1 − SogCLR"]
    assert md["SogCLR"][head.index(f"{CC3M} ours")] == "23.30 (n=1)"
    assert md["SogCLR"][head.index(f"{CC3M} published")] == "23.41"
    assert md["gain FastCLIP-v1 − SogCLR"][head.index(f"{CC3M} published")] == "+1.46"
    assert md["gain FastCLIP-v1 − SogCLR"][head.index(f"{CC3M} ours")] == "—"


def test_ablation_and_stress_tables(out):
    md = md_rows(out / "tables" / "ablation_synthetic_tiny.md")
    head = md["method: variant"]
    assert head[1:] == ["tiny-suite avg (stand-in) ours", "Δ vs default", "synthetic retrieval R@1 (stand-in) ours"]
    assert md["NeuCLIP: T_u=1"][1:] == ["46.00 ± 0.00 (n=2)", "-2.00", "37.00 ± 1.41 (n=2)"]
    assert "published" not in head  # tiny scale: never beside the paper's DFN-14M ablations
    stress = pd.read_csv(out / "tables" / "stress.csv").set_index("estimator")
    raw = pd.read_csv(FIXTURE / "tiny/error_study/stress.csv").set_index("method")
    assert set(stress.index) == {"OpenCLIP", "SogCLR", "FastCLIP-v3", "AmorLIP", "NeuCLIP"}
    assert stress.loc["NeuCLIP", "batch halved: error ratio"] == pytest.approx(raw.loc["neuclip", "batch_halved_ratio"])
    assert stress.loc["OpenCLIP"].filter(like="published").tolist() == [8.2, 12.8]


def test_plots_and_index(out):
    stems = [
        "training_cc3m_paper",
        "training_synthetic_tiny",
        "ablation_synthetic_tiny",
        "error_vs_ratio",
        "error_over_steps",
        "error_training_synthetic_tiny",
    ]
    for stem in stems:
        for ext in ("png", "pdf"):
            assert (out / "plots" / f"{stem}.{ext}").stat().st_size > 1000, (stem, ext)
    index = (out / "index.md").read_text()
    assert all(f"plots/{s}.png" in index for s in stems)
    assert all(f"tables/{t}.md" in index for t in ("main", "stress", "runs", "ablation_synthetic_tiny"))
    assert "tables/missing.md" in index
    tex = (out / "tables" / "ablation_synthetic_tiny.tex").read_text()
    assert r"NeuCLIP: T\_u=1 & 46.00 $\pm$ 0.00 (n=2)" in tex and r"\begin{tabular}{lrrr}" in tex


def test_error_curves_table_holds_default_runs_only(out):
    curves = pd.read_csv(out / "tables" / "error_curves.csv")
    # tiny: 4 methods x 2 seeds, 4 points each; the ablation variant's curve is left out; paper runs have none
    assert len(curves) == 4 * 2 * 4
    assert set(curves["method"]) == {"openclip", "sogclr", "fastclip", "neuclip"}
    assert set(curves["scale"]) == {"tiny"} and set(curves["step"]) == {25, 50, 75, 100}
    row = curves[(curves["method"] == "neuclip") & (curves["seed"] == 1) & (curves["step"] == 50)].iloc[0]
    assert row["mse_log"] == pytest.approx((0.05 + 0.02 * 3) * 1.1 * 3)
    assert "error_training_cc3m_paper.png" not in {p.name for p in (out / "plots").iterdir()}


def test_expect_file_and_stale_outputs(tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root)
    out = tmp_path / "results"
    assert main(["report", "--runs", str(root), "--out", str(out), "--no-plots"]) == 0
    assert (out / "tables" / "ablation_synthetic_tiny.md").exists()
    shutil.rmtree(root / "tiny/synthetic/neuclip/T_u=1")
    expect = tmp_path / "expect.yaml"
    expect.write_text("- {dataset: cc3m, scale: paper, methods: [openclip, amorlip], seeds: [0, 1, 2]}\n")
    assert main(["report", "--runs", str(root), "--out", str(out), "--no-plots", "--expect", str(expect)]) == 0
    assert not (out / "tables" / "ablation_synthetic_tiny.md").exists()  # stale output removed
    md = md_rows(out / "tables" / "main.md")
    head = md["method"]
    assert md["AmorLIP"][head.index(f"{CC3M} ours")] == "—"
    assert md["AmorLIP"][head.index(f"{CC3M} published")] == "22.89"
    assert md["NeuCLIP"][head.index(f"{CC3M} ours")] == "25.10 ± 0.14 (n=2)"  # found, though not expected
    missing = (out / "tables" / "missing.md").read_text()
    assert missing.count("AmorLIP on CC3M [paper], variant default, seed") == 3 * 3  # 3 tables x 3 seeds
    assert "NeuCLIP on CC3M" not in missing


def test_bad_inputs_fail_with_a_message(tmp_path, capsys):
    assert main(["report", "--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "expect.yaml"
    bad.write_text("- {dataset: cc3m}\n")
    assert main(["report", "--runs", str(FIXTURE), "--out", str(tmp_path / "o"), "--expect", str(bad)]) == 2
    assert "needs dataset, method" in capsys.readouterr().err
