"""Plots of the error study: error against n/B (log-log) per budget and batch size, and error over steps."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from neuclip.atomic import write_atomic  # noqa: E402
from neuclip.error_study.fit import final_points, fit_table
from neuclip.estimators.registry import colours  # noqa: E402

LABELS = {"mse_log": "MSE of log-normaliser estimate", "mean_rel_err": "mean relative error of normaliser"}
COLOURS = colours()  # each estimator class declares its colour


def finish(fig, axes, metric: str, title: str, stem: Path) -> None:
    """Shared labels, legend outside the last panel, title, then save."""
    for row in axes:
        row[0].set_ylabel(LABELS.get(metric, metric))
    axes[0][-1].legend(title="estimator", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.suptitle(title)
    save(fig, stem)


def save(fig, stem: Path) -> None:
    """PNG and PDF, each written atomically (neuclip/atomic.py)."""
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=130, bbox_inches="tight")
        write_atomic(f"{stem}.{ext}", buf.getvalue())
    plt.close(fig)


def with_budget(frame: pd.DataFrame) -> pd.DataFrame:
    """Frames written before budgets existed: one step budget; `visited` = the least coverage of any method
    at that point (a per-sample estimator's coverage is exactly the anchors visited)."""
    if "budget" in frame and "visited" in frame:
        return frame
    frame = frame.copy()
    if "budget" not in frame:
        frame["budget"] = frame["steps"].map(lambda s: f"{int(s)} steps")
    if "visited" not in frame:
        frame["visited"] = frame.groupby(["n", "batch_size", "seed", "step"])["coverage"].transform("min")
    return frame


def plot_error_vs_ratio(frame: pd.DataFrame, stem: Path, metric: str = "mse_log", markers=None, fits=None) -> None:
    """A panel per (budget, global batch size); a line per method (mean over seeds, band = min..max over seeds).

    Hollow markers: points where not every anchor was visited (their coverage is printed along the bottom);
    dashed: the power law fitted where every anchor was visited (fit.py), drawn out to the last marker;
    dotted verticals: the paper data sets' n/B (`markers`, fit.paper_markers)."""
    frame = with_budget(frame)
    last = final_points(frame)
    fits = fit_table(frame, metric) if fits is None else fits
    markers = markers or []
    budgets, sizes = list(dict.fromkeys(last["budget"])), sorted(last["batch_size"].unique())
    fig, axes = plt.subplots(len(budgets), len(sizes), figsize=(5.5 * len(sizes), 4.2 * len(budgets)),
                             squeeze=False, sharey=True, layout="constrained")
    right = max([last["n_over_b"].max()] + [m["n_over_b"] for m in markers])
    for r, budget in enumerate(budgets):
        for ax, b in zip(axes[r], sizes):
            part = last[(last["budget"] == budget) & (last["batch_size"] == b)]
            for method, rows in part.groupby("method"):
                colour = COLOURS.get(method)
                stats = rows.groupby("n_over_b").agg(mean=(metric, "mean"), lo=(metric, "min"), hi=(metric, "max"),
                                                     visited=("visited", "min")).sort_index()
                full = stats["visited"] >= 1.0
                ax.plot(stats.index, stats["mean"], color=colour, label=method)
                ax.plot(stats.index[full], stats["mean"][full], "o", color=colour)
                ax.plot(stats.index[~full], stats["mean"][~full], "o", mfc="none", color=colour)
                ax.fill_between(stats.index, stats["lo"], stats["hi"], alpha=0.2, color=colour)
                law = fits[(fits["budget"] == budget) & (fits["method"] == method) & (fits["batch_size"] == b)] \
                    if len(fits) else fits
                if len(law):
                    f = law.iloc[0]
                    xs = np.geomspace(f["ratio_min"], max(right, f["ratio_max"]), 50)
                    ax.plot(xs, np.exp(f["log_c"]) * xs ** f["k"], "--", color=colour, alpha=0.7, lw=1)
            partial = part.groupby("n_over_b")["visited"].min()
            for ratio, visited in partial[partial < 1.0].items():
                ax.annotate(f"{visited:.0%}", (ratio, 0.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                            textcoords="offset points", ha="center", fontsize="x-small", color="grey")
            _markers(ax, markers)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(last["n_over_b"].min() / 1.5, right * 4)  # room for the last marker's label
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("data set size / global batch size (n/B)")
            ax.set_title(f"{budget}, global batch B = {b}")
            ax.grid(True, which="both", alpha=0.3)
    values = last[metric][np.isfinite(last[metric]) & (last[metric] > 0)]
    if len(values):  # the data decides the range; a steep fitted law may leave the panel
        axes[0][0].set_ylim(values.min() / 3, values.max() * 10)
    title = "Normaliser estimation error against n/B (shadow estimators, one trajectory)"
    if markers or len(fits):
        title += "\nhollow: not every anchor visited (% visited at the bottom); dashed: fitted power law"
    finish(fig, axes, metric, title, stem)


def _markers(ax, markers) -> None:
    """A dotted vertical per data set, labelled at the top; labels of neighbours within 2x of each other step
    down so that they do not overlap (CC3M, DFN-14M and CC12M sit within a factor 1.7)."""
    level, previous = 0, None
    for m in sorted(markers, key=lambda m: m["n_over_b"]):
        level = level + 1 if previous and m["n_over_b"] < 2 * previous else 0
        previous = m["n_over_b"]
        ax.axvline(m["n_over_b"], color="grey", ls=":", lw=1)
        ax.annotate(m["label"], (m["n_over_b"], 1.0), xycoords=("data", "axes fraction"), xytext=(2, -3 - 9 * level),
                    textcoords="offset points", va="top", fontsize="x-small", color="dimgrey")


def plot_error_over_steps(frame: pd.DataFrame, stem: Path, metric: str = "mse_log") -> None:
    """Error over training for the largest and smallest n/B of the largest batch size, in the budget with the
    most measurement points per run (the step budget)."""
    frame = with_budget(frame)
    points = frame.groupby("budget", sort=False)["step"].nunique()
    part = frame[frame["budget"] == points.idxmax()]
    b = part["batch_size"].max()
    part = part[part["batch_size"] == b]
    ratios = sorted(part["n_over_b"].unique())
    picks = [ratios[0], ratios[-1]] if len(ratios) > 1 else ratios
    fig, axes = plt.subplots(1, len(picks), figsize=(5 * len(picks), 4), squeeze=False, sharey=True)
    for ax, ratio in zip(axes[0], picks):
        rows = part[part["n_over_b"] == ratio]
        for method, m in rows.groupby("method"):
            stats = m.groupby("step")[metric].mean().sort_index()
            ax.plot(stats.index, stats.values, marker="o", label=method, color=COLOURS.get(method))
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(f"n/B = {ratio:g} (B = {b}, {points.idxmax()})")
        ax.grid(True, which="both", alpha=0.3)
    finish(fig, axes, metric, "Normaliser estimation error over training", stem)
