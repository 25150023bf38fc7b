"""Power laws fitted to the sweep's error curves, and the paper data sets' n/B (docs/method.md §6, §8).

    log err = log c + k log(n/B), least squares, one fit per seed over the points where every anchor has been
    visited (visited = 1: a per-sample estimator has a state for each; the same range for every method)

The exponent and the extrapolated errors are the mean over seeds with a Student-t interval over seeds (seed
count - 1 degrees of freedom; with 2 seeds it is wide, and says so). One fit per (budget, method, B): the
mini-batch error depends on B itself, not only on n/B.

The paper's n/B markers are derived, never typed: n = the registry's num_samples (workflows/datasets.yaml) and
B = the global batch of the paper grid's train config (workflows/configs/paper.yaml), both read through
neuclip.grid.workflow exactly as the training runs read them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

import neuclip.grid.workflow as wf
from neuclip.yamlio import yaml_load

CONFIDENCE = 0.95


def fit_power_law(ratio, error) -> tuple[float, float]:
    """(log c, k) of error = c * ratio^k by least squares in log-log space; needs two distinct ratios."""
    x, y = np.log(np.asarray(ratio, dtype=float)), np.log(np.asarray(error, dtype=float))
    if np.unique(x).size < 2:
        raise ValueError("a power-law fit needs points at two or more distinct n/B")
    k, log_c = np.polyfit(x, y, 1)
    return float(log_c), float(k)


def _interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and the two ends of its t-interval over replicates (nan ends for a single replicate)."""
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return mean, mean - float(half), mean + float(half)


def final_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Each run's last measurement per budget (the point a budget is compared at)."""
    return frame[frame["step"] == frame["steps"]]


def fit_table(frame: pd.DataFrame, metric: str = "mse_log") -> pd.DataFrame:
    """One row per (budget, method, batch_size): exponent k and log c (mean over seeds, t-interval), the
    per-seed exponents and the n/B range fitted."""
    pts = final_points(frame)
    pts = pts[(pts["visited"] >= 1.0) & np.isfinite(pts[metric]) & (pts[metric] > 0)]
    rows = []
    for (budget, method, b), part in pts.groupby(["budget", "method", "batch_size"], sort=False):
        per_seed = []
        for seed, s in part.groupby("seed"):
            if s["n_over_b"].nunique() >= 2:
                per_seed.append((seed, *fit_power_law(s["n_over_b"], s[metric])))
        if not per_seed:
            continue
        log_c = np.array([p[1] for p in per_seed])
        k = np.array([p[2] for p in per_seed])
        k_mean, k_lo, k_hi = _interval(k)
        c_mean, c_lo, c_hi = _interval(log_c)
        rows.append(
            {
                "budget": budget,
                "method": method,
                "batch_size": int(b),
                "metric": metric,
                "k": k_mean,
                "k_lo": k_lo,
                "k_hi": k_hi,
                "log_c": c_mean,
                "log_c_lo": c_lo,
                "log_c_hi": c_hi,
                "k_per_seed": " ".join(f"{v:.4g}" for v in k),
                "seeds": len(per_seed),
                "points": int(len(part)),
                "ratio_min": float(part["n_over_b"].min()),
                "ratio_max": float(part["n_over_b"].max()),
                "confidence": CONFIDENCE,
            }
        )
    return pd.DataFrame(rows)


def extrapolate(frame: pd.DataFrame, fits: pd.DataFrame, markers: list[dict]) -> pd.DataFrame:
    """The fitted law at each marker's n/B: per-seed predictions c_s r^k_s, mean of their logs and its
    t-interval over seeds, reported as errors (exp of those). `extrapolated` is true beyond the fitted range."""
    pts = final_points(frame)
    pts = pts[(pts["visited"] >= 1.0) & np.isfinite(pts["mse_log"])]
    rows = []
    for fit in fits.to_dict("records"):
        part = pts[(pts["budget"] == fit["budget"]) & (pts["method"] == fit["method"])
                   & (pts["batch_size"] == fit["batch_size"])]
        laws = [fit_power_law(s["n_over_b"], s[fit["metric"]]) for _, s in part.groupby("seed")
                if s["n_over_b"].nunique() >= 2]
        for m in markers:
            logs = np.array([log_c + k * math.log(m["n_over_b"]) for log_c, k in laws])
            mean, lo, hi = _interval(logs)
            rows.append(
                {
                    "budget": fit["budget"],
                    "method": fit["method"],
                    "batch_size": fit["batch_size"],
                    "dataset": m["dataset"],
                    "n_over_b": m["n_over_b"],
                    f"{fit['metric']}_fit": math.exp(mean),
                    "lo": math.exp(lo) if not math.isnan(lo) else math.nan,
                    "hi": math.exp(hi) if not math.isnan(hi) else math.nan,
                    "extrapolated": bool(m["n_over_b"] > fit["ratio_max"]),
                }
            )
    return pd.DataFrame(rows)


def paper_markers(config_path: str | os.PathLike) -> list[dict]:
    """[{dataset, label, num_samples, global_batch_size, n_over_b}] for each data set of an experiment config
    (the paper grid), in its order; n and B come from the train config the workflow builds for that data set."""
    path = Path(config_path)
    if not path.is_absolute() and not path.exists() and (wf.REPO / path).exists():
        path = wf.REPO / path
    config = yaml_load(path.read_text())
    methods = config.get("methods") or []
    if not config.get("datasets") or not methods:
        raise KeyError(f"{path}: markers need an experiment config with `datasets` and `methods`")
    out = []
    for dataset in config["datasets"]:
        train = wf.train_config(config, wf.Run(dataset, methods[0], "default", wf.seeds_for(config, dataset)[0]))
        n, b = train["data"]["train_num_samples"], train["train"].get("global_batch_size")
        if not n or not b:
            raise KeyError(
                f"{path}: data set {dataset!r} needs num_samples (workflows/datasets.yaml) and "
                f"train.global_batch_size (per_dataset.{dataset}.train) for its n/B marker"
            )
        out.append(
            {
                "dataset": dataset,
                "label": wf.registry(config)[dataset].get("label", dataset),  # the registry's, as tables use
                "num_samples": int(n),
                "global_batch_size": int(b),
                "n_over_b": n / b,
            }
        )
    return out
