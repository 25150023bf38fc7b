"""The shadow sweep: decoupled randomness, flat-memory measurement, budgets, power-law fits and the paper's n/B."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import tests.reference as ref
from neuclip.error_study import fit, plots
from neuclip.error_study.estimates import minibatch_log_normalizers, minibatch_log_normalizers_of
from neuclip.error_study.exact import exact_log_normalizers
from neuclip.error_study.shadow import ShadowRun, exact_streamed, run
from neuclip.error_study.sweep import check_config, estimate_wall_seconds, load_config, plan, plan_summary, run_sweep
from neuclip.error_study.synthetic import ClusteredPairs

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "workflows" / "configs" / "paper.yaml"
SMALL_SHADOWS = {"openclip": {}, "fastclip": {}, "neuclip": {"num_prototypes": 16, "inner_steps": 1}}


def test_adding_a_measurement_point_leaves_the_other_points_unchanged():
    # every default shadow (AmorLIP and NeuCLIP included): measuring must neither draw from the training
    # order's generator nor touch any estimator's state
    base = dict(n=256, batch_size=32, steps=24, anchors=64)
    two = pd.DataFrame(run(ShadowRun(**base, measure_at=[8, 24])))
    three = pd.DataFrame(run(ShadowRun(**base, measure_at=[8, 16, 24])))
    assert sorted(three["step"].unique()) == [8, 16, 24]
    kept = three[three["step"] != 16].reset_index(drop=True)
    pd.testing.assert_frame_equal(two, kept, check_exact=True)
    assert set(two["method"]) == {"openclip", "sogclr", "fastclip", "amorlip", "neuclip"}


def test_seeds_are_replicates_and_runs_repeat_exactly():
    cfg = dict(n=128, batch_size=16, steps=8, anchors=32, shadows=SMALL_SHADOWS)
    a, b = run(ShadowRun(**cfg, seed=0)), run(ShadowRun(**cfg, seed=0))
    assert a == b
    c = run(ShadowRun(**cfg, seed=1))
    assert [r["mse_log"] for r in a] != [r["mse_log"] for r in c]


def test_features_are_a_function_of_seed_and_sample_id():
    data = ClusteredPairs(seed=3, dim_in=16, clusters=8, noise=0.6)
    ids = torch.tensor([5, 900_000, 17, 3_000_000_000, 5])
    image, text = data.features(ids)
    assert torch.equal(image[0], image[4]) and torch.equal(text[0], text[4])
    alone = data.features(ids[1:2])
    assert torch.equal(alone[0][0], image[1])  # images bit for bit
    torch.testing.assert_close(alone[1][0], text[1], rtol=0, atol=1e-5)  # texts up to one matmul's rounding
    # the rows of a large chunk are the rows generated one batch at a time (n-independent data set)
    chunk = data.features(torch.arange(5000))[0]
    assert torch.equal(chunk[4990:], data.features(torch.arange(4990, 5000))[0])
    other = ClusteredPairs(seed=4, dim_in=16, clusters=8, noise=0.6).features(ids)[0]
    assert not torch.allclose(other, image)
    z = data.features(torch.arange(200_000))[0] - data.centres[data.labels(torch.arange(200_000))]
    # image = centre + noise (z0 + z1): each coordinate N(0, 2 noise^2)
    assert abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(0.6 * math.sqrt(2), rel=0.01)
    counts = torch.bincount(data.labels(torch.arange(80_000)), minlength=8).double()
    assert float((counts / 10_000 - 1).abs().max()) < 0.05


@pytest.mark.parametrize(("dtype", "tau", "atol"), [(torch.float64, 0.07, 1e-12), (torch.float32, 0.01, 1e-4)])
def test_streamed_exact_pass_equals_the_exact_pass(dtype, tau, atol):
    # float64 at tau 0.07 takes the direct-sum kernel, float32 at 0.01 the running log-sum-exp one
    gen = torch.Generator().manual_seed(0)
    e1, e2 = (x.to(dtype) for x in ref.correlated_pair(3000, 16, gen))
    anchors = torch.randperm(3000, generator=gen)[:200]
    want = exact_log_normalizers(e1.double(), e2.double(), tau, 1e-14, anchors=anchors, accumulate="float64")
    columns = ((c, e1[c : c + 777], e2[c : c + 777]) for c in range(0, 3000, 777))
    got = exact_streamed(e1[anchors], e2[anchors], anchors, columns, 3000, tau, 1e-14, anchor_block=64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=atol)
    with pytest.raises(ValueError, match="expected n = 3000"):
        exact_streamed(e1[anchors], e2[anchors], anchors, [(0, e1[:10], e2[:10])], 3000, tau, 1e-14)


def test_minibatch_estimate_from_an_embed_function_equals_the_in_memory_one():
    gen = torch.Generator().manual_seed(1)
    e1, e2 = (x.float() for x in ref.correlated_pair(1000, 8, gen))
    anchors = torch.randperm(1000, generator=gen)[:300]
    calls = []

    def embed(ids):
        calls.append(ids.numel())
        return e1[ids], e2[ids]

    for batch in (7, 64):  # 1000 mod 7 != 0: anchors in the partition's leftover slots stay NaN
        want = minibatch_log_normalizers(e1, e2, 0.1, 1e-14, batch, anchors, torch.Generator().manual_seed(2))
        calls.clear()
        got = minibatch_log_normalizers_of(embed, 1000, 0.1, 1e-14, batch, anchors,
                                           torch.Generator().manual_seed(2), e1.device, rows_per_call=256)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
        assert sum(calls) <= batch * anchors.numel() and max(calls) <= max(256, batch)


def _synthetic_frame(laws: dict, seeds=(0, 1, 2), noise=0.05, rng=None) -> pd.DataFrame:
    """Final-step rows with error = c (n/B)^k times log-normal noise; visited < 1 beyond n/B = 1000 with a
    wildly different error (those points must not enter the fit)."""
    rng = rng or np.random.default_rng(0)
    rows = []
    for (method, b), (c, k) in laws.items():
        for seed in seeds:
            for r in (10, 30, 100, 300, 1000, 3000, 10000):
                visited = 1.0 if r <= 1000 else 0.2
                err = c * r**k * math.exp(noise * rng.standard_normal()) if visited == 1 else 1e3
                rows.append({"budget": "1 epoch", "method": method, "batch_size": b, "n": r * b, "n_over_b": r,
                             "seed": seed, "step": r, "steps": r, "visited": visited, "mse_log": err,
                             "coverage": visited})
    return pd.DataFrame(rows)


def test_fit_recovers_a_known_exponent_and_extrapolates_the_law():
    laws = {("fastclip", 32): (0.01, 0.8), ("fastclip", 64): (0.005, 0.8), ("neuclip", 32): (0.5, 0.05)}
    frame = _synthetic_frame(laws)
    fits = fit.fit_table(frame).set_index(["method", "batch_size"])
    for key, (c, k) in laws.items():
        f = fits.loc[key]
        assert f["k"] == pytest.approx(k, abs=0.03) and f["k_lo"] < f["k"] < f["k_hi"], (key, f.to_dict())
        assert math.exp(f["log_c"]) == pytest.approx(c, rel=0.15)
        assert (f["ratio_min"], f["ratio_max"], f["seeds"]) == (10, 1000, 3)
    markers = [{"dataset": "inside", "n_over_b": 500.0}, {"dataset": "far", "n_over_b": 2e5}]
    extra = fit.extrapolate(frame, fit.fit_table(frame), markers).set_index(["method", "batch_size", "dataset"])
    for (method, b), (c, k) in laws.items():
        for m in markers:
            row = extra.loc[(method, b, m["dataset"])]
            assert row["mse_log_fit"] == pytest.approx(c * m["n_over_b"] ** k, rel=0.25)
            assert row["lo"] < row["mse_log_fit"] < row["hi"]
            assert bool(row["extrapolated"]) == (m["n_over_b"] > 1000)
    with pytest.raises(ValueError, match="two or more distinct"):
        fit.fit_power_law([10, 10], [1.0, 2.0])


def test_the_interval_over_seeds_covers_the_true_exponent_at_its_stated_rate():
    rng = np.random.default_rng(1)
    inside = []
    for _ in range(200):
        f = fit.fit_table(_synthetic_frame({("fastclip", 32): (0.01, 0.8)}, rng=rng)).iloc[0]
        inside.append(f["k_lo"] < 0.8 < f["k_hi"])
    assert 0.9 <= np.mean(inside) <= 0.99, np.mean(inside)  # 95 % nominal; 200 draws: +-3 % at 2 sigma


def test_markers_sit_at_the_registry_n_over_b():
    registry = yaml.safe_load((REPO / "workflows" / "datasets.yaml").read_text())
    paper = yaml.safe_load(PAPER.read_text())
    markers = fit.paper_markers(PAPER)
    assert [m["dataset"] for m in markers] == paper["datasets"]
    for m in markers:
        batch = paper["per_dataset"][m["dataset"]]["train"]["global_batch_size"]
        assert m["n_over_b"] == registry[m["dataset"]]["num_samples"] / batch
    by_name = {m["dataset"]: m["n_over_b"] for m in markers}
    assert 1.5e5 < by_name["dfn1b"] < 2.5e5 and 2e3 < by_name["cc3m"] < 3e3  # the table, as a sanity check


def test_plot_draws_a_labelled_line_at_each_marker_and_the_fitted_law(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, stem: figures.append(fig))
    frame = _synthetic_frame({("fastclip", 32): (0.01, 0.8), ("neuclip", 32): (0.5, 0.05)})
    markers = fit.paper_markers(PAPER)
    plots.plot_error_vs_ratio(frame, tmp_path / "plot", markers=markers)
    (ax,) = figures[0].axes
    verticals = {ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"}
    assert verticals == {m["n_over_b"] for m in markers}
    assert {t.get_text() for t in ax.texts} >= {m["label"] for m in markers}
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 2 and all(ln.get_xdata()[-1] >= max(verticals) for ln in dashed)


def test_plan_merges_runs_two_budgets_share_and_respects_max_ratio():
    cfg = {"grid": {"ratio": [8, 64], "batch_size": [8]}, "seeds": [0], "steps": 64, "measure_at": [32, 64],
           "epochs": [{"epochs": 1}, {"epochs": 3, "max_ratio": 8}]}
    jobs = {(j["n"], j["steps"]): j for j in plan(cfg)}
    assert set(jobs) == {(64, 64), (64, 8), (64, 24), (512, 64)}
    shared = jobs[(512, 64)]  # 64 steps = 1 epoch at n/B = 64: one run, both budgets
    assert shared["budgets"] == {"64 steps": [32, 64], "1 epoch": [64]} and shared["measure_at"] == [32, 64]
    assert jobs[(64, 24)]["budgets"] == {"3 epochs": [24]}
    summary = plan_summary(plan(cfg))
    assert summary.loc["64 steps + 1 epoch", "runs"] == 1 and summary["steps"].sum() == 64 + 64 + 8 + 24
    # 10 ms a step, 1 us a row, nothing per anchor: jobs of 0.64 + 2 x 512e-6, 0.64 + 2 x 64e-6, 0.24 + 64e-6 and
    # 0.08 + 64e-6 s, in that order; each goes to the worker free first, so the second worker ends last
    assert estimate_wall_seconds(plan(cfg), 10, 1, 0, workers=2) == pytest.approx(0.64 + 128e-6 + 0.24 + 64e-6)
    with pytest.raises(KeyError, match=r"epochs\[0\]"):
        check_config({**cfg, "epochs": [{"epochs": 0}]})
    with pytest.raises(KeyError, match="grid"):
        check_config({"grid": {"n": [64], "ratio": [8], "batch_size": [8]}})


def test_small_sweep_writes_every_table_and_plot(tmp_path):
    cfg = {"grid": {"ratio": [4, 8, 16], "batch_size": [8]}, "seeds": [0, 1], "steps": 8, "measure_at": [4, 8],
           "epochs": [{"epochs": 1}], "markers": str(PAPER), "jobs": 1,
           "run": {"anchors": 128, "shadows": SMALL_SHADOWS}}  # every sample an anchor
    frame = run_sweep(cfg, tmp_path)
    assert list(dict.fromkeys(frame["budget"])) == ["8 steps", "1 epoch"]
    for name in ("errors.csv", "errors.json", "fits.csv", "extrapolated.csv", "summary.md", "timings.csv",
                 "stress.csv", "stress.md", "error_vs_ratio.png", "error_vs_ratio.pdf", "error_over_steps.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    steps = frame[frame["budget"] == "8 steps"]
    # 8 steps of B = 8 visit 64 samples: all of n = 32 and 64, half of n = 128
    assert dict(steps[steps["step"] == 8].groupby("n_over_b")["visited"].max()) == {4: 1.0, 8: 1.0, 16: 0.5}
    fits = pd.read_csv(tmp_path / "fits.csv")
    assert set(fits["budget"]) == {"8 steps", "1 epoch"}
    assert fits[fits["budget"] == "8 steps"]["ratio_max"].max() == 8  # the half-visited point is left out
    extra = pd.read_csv(tmp_path / "extrapolated.csv")
    assert set(extra["dataset"]) == set(yaml.safe_load(PAPER.read_text())["datasets"])
    assert "8 steps" in pd.read_csv(tmp_path / "stress.csv")["scale"].iloc[0]


@pytest.mark.parametrize("name", ["error_study", "error_study_paper_ratios"])
def test_shipped_sweep_configs_load_and_plan(name, tmp_path):
    import neuclip.grid.workflow as wf

    config = yaml.safe_load((REPO / "workflows" / "configs" / f"{name}.yaml").read_text())
    wf.validate_config(config)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config["error_study"]))
    jobs = plan(load_config(path))  # the block alone (what the Snakemake rule writes) or the experiment config
    assert plan(load_config(REPO / "workflows" / "configs" / f"{name}.yaml")) == jobs
    assert jobs and all(j["n"] >= 2 * j["batch_size"] for j in jobs)
    if name == "error_study_paper_ratios":
        assert max(j["n"] / j["batch_size"] for j in jobs) >= 2e5
        labels = {label for j in jobs for label in j["budgets"]}
        assert {"1 epoch", "3 epochs"} <= labels and any(lab.endswith(" steps") for lab in labels)
