"""The driver study (neuclip/study/drivers.py) and the rho rule it applies (neuclip/estimators/rho.py): the rule's
values and tiny.yaml's rho, the plan (one declared rule per method, shared runs once), fixed temperatures that
stay fixed through the trainer's step, and a small study end to end, resumed."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from neuclip.estimators.rho import rho_for
from neuclip.study.driver_run import DriverRun, run
from neuclip.study.drivers import check_config, load_config, plan, run_study, t_interval
from neuclip.yamlio import load_file

REPO = Path(__file__).resolve().parent.parent


def test_rho_rule_is_cc3m_at_cc3m_and_gives_tiny_its_value():
    assert rho_for(2_720_000, 1024) == pytest.approx(6.5)
    assert rho_for(4096, 64) == pytest.approx(math.log(4096 / (4 * 64)), abs=2e-3)  # n_eff = 4 B
    assert rho_for(100, 64) == 0.0  # never negative
    tiny = load_file(REPO / "workflows/configs/tiny.yaml")
    n, batch = tiny["synthetic"]["num_train"], tiny["train"]["global_batch_size"]
    assert tiny["common_options"]["rho"] == round(rho_for(n, batch), 2)


def test_plan_applies_one_rule_and_runs_shared_budgets_once():
    cfg = {"methods": ["openclip", "neuclip"], "seeds": [0], "batch_size": [32], "ratio": [10, 100],
           "epochs": 1, "steps": 100, "fixed_tau": {"values": [0.03], "ratio": 10},
           "options": {"neuclip": {"num_prototypes": 64}}}
    check_config(cfg)
    entries = plan(cfg)
    shared = [e for e in entries if e["run"]["n"] == 3200 and e["run"]["fixed_tau"] is None]
    assert len(shared) == 2 and all(sorted(e["budgets"]) == ["1 epoch", "100 steps"] for e in shared)
    neu = [e["run"] for e in entries if e["run"]["method"] == "neuclip"]
    assert all(r["options"]["rho"] == rho_for(r["n"], 32) and r["options"]["num_prototypes"] == 64 for r in neu)
    assert all("rho" not in e["run"]["options"] for e in entries if e["run"]["method"] == "openclip")
    assert len(entries) == 2 * (2 + 1 + 1)  # per method: n/B 10 (1 epoch, 100 steps), 100 (shared), fixed tau
    with pytest.raises(KeyError, match="rho comes from the data set's rule"):
        check_config({**cfg, "options": {"neuclip": {"rho": 1.0}}})
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        check_config({**cfg, "methods": ["nope"]})


@pytest.mark.parametrize("method", ["openclip", "siglip", "isogclr", "fastclip", "amorlip", "neuclip"])
def test_a_fixed_temperature_stays_fixed_through_the_trainers_step(method):
    options = {"num_prototypes": 16} if method == "neuclip" else {}
    row = run(DriverRun(method, n=128, batch_size=16, steps=12, fixed_tau=0.03, options=options, heldout=64,
                        anchors=64))
    assert row["final_tau"] == pytest.approx(0.03, rel=1e-6), row["tau_path"]
    assert row["tau_mode"] == "fixed 0.03"


def test_t_interval_over_seeds():
    mean, half = t_interval(pd.Series([1.0, 2.0, 3.0]))
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(t_interval(pd.Series([1.0]))[1])


@pytest.mark.slow
def test_the_tiny_drivers_block_runs_end_to_end_and_resumes(tmp_path):
    """tiny.yaml's drivers block (the CI size of the study): every table and plot, every method learning far
    above chance at the learned-tau points of the step budget, and a rerun that trains nothing."""
    cfg = load_config(REPO / "workflows/configs/tiny.yaml")
    messages = []
    frame = run_study(cfg, tmp_path, progress=messages.append)
    for name in ("runs.csv", "summary.csv", "learned.md", "fixed_tau.md", "claims.md", "accuracy_vs_ratio.png",
                 "accuracy_vs_batch.png"):
        assert (tmp_path / name).is_file(), name
    learned = frame[(frame["tau_mode"] == "learned") & (frame["budget"] == f"{cfg['steps']} steps")]
    assert set(learned["method"]) == set(cfg["methods"])
    assert (learned["i2t_top1"] > 20 * learned["chance_retrieval"]).all(), learned[["method", "n", "i2t_top1"]]
    assert "NeuCLIP" in (tmp_path / "claims.md").read_text()
    again = []
    run_study(cfg, tmp_path, progress=again.append)
    assert again[0].startswith("drivers: 0 runs to do")


def test_npn_capacity_fits_exact_targets_and_reports_error_by_tau_and_m(tmp_path):
    """The fit lowers the NPN's error from its restart; at a low tau the best fit is far worse than at 0.07
    (the NPN's capacity bound that docs/methods.md states); the tables and plot are written."""
    from neuclip.study.npn_capacity import main

    frame = main(tmp_path, n=512, batch=32, steps=60, taus=(0.07, 0.01), prototypes=(32, 128), fit_steps=40,
                 progress=lambda _: None)
    assert len(frame) == 4 and (frame["abs_err"] < frame["abs_err_at_start"]).all()
    by = frame.set_index(["tau", "m"])["abs_err"]
    assert by[(0.01, 128)] > 5 * by[(0.07, 128)]
    for name in ("npn_capacity.csv", "npn_capacity.md", "npn_capacity.png"):
        assert (tmp_path / name).is_file()
