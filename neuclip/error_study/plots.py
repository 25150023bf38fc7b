"""Plots of the error study: error against n/B (log-log) and error over training steps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

LABELS = {"mse_log": "MSE of log-normaliser estimate", "mean_rel_err": "mean relative error of normaliser"}
COLOURS = {
    "openclip": "tab:blue",
    "sogclr": "tab:orange",
    "fastclip": "tab:red",
    "amorlip": "tab:purple",
    "neuclip": "tab:green",
}


def finish(fig, axes, metric: str, title: str, stem: Path) -> None:
    """Shared labels, legend outside the last panel, title, then save."""
    axes[0][0].set_ylabel(LABELS.get(metric, metric))
    axes[0][-1].legend(title="estimator", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    save(fig, stem)


def save(fig, stem: Path) -> None:
    for ext in ("png", "pdf"):
        fig.savefig(f"{stem}.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_error_vs_ratio(frame: pd.DataFrame, stem: Path, metric: str = "mse_log") -> None:
    """One panel per global batch size; a line per method (mean over seeds, band = min..max over seeds)."""
    last = frame[frame["step"] == frame["steps"]]
    sizes = sorted(last["batch_size"].unique())
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], sizes):
        part = last[last["batch_size"] == b]
        for method, rows in part.groupby("method"):
            stats = rows.groupby("n_over_b")[metric].agg(["mean", "min", "max"]).sort_index()
            colour = COLOURS.get(method)
            ax.plot(stats.index, stats["mean"], marker="o", label=method, color=colour)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2, color=colour)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("data set size / global batch size (n/B)")
        ax.set_title(f"global batch B = {b}, {int(part['steps'].iloc[0])} steps")
        ax.grid(True, which="both", alpha=0.3)
    finish(fig, axes, metric, "Normaliser estimation error against n/B (shadow estimators, one trajectory)", stem)


def plot_error_over_steps(frame: pd.DataFrame, stem: Path, metric: str = "mse_log") -> None:
    """Error over training for the largest and smallest n/B of the largest batch size."""
    b = frame["batch_size"].max()
    part = frame[frame["batch_size"] == b]
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
        ax.set_title(f"n/B = {ratio:g} (B = {b})")
        ax.grid(True, which="both", alpha=0.3)
    finish(fig, axes, metric, "Normaliser estimation error over training", stem)
