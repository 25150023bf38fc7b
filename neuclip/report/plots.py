"""Report plots (PNG + PDF, matplotlib Agg): training curves, ablation bars, and the error study's own plots."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from neuclip.error_study.plots import COLOURS as ERROR_COLOURS  # noqa: E402
from neuclip.error_study.plots import plot_error_over_steps, plot_error_vs_ratio, save  # noqa: E402
from neuclip.report.loading import Run, Study, dataset_label, read_metrics, sort_key_column, sort_key_method  # noqa: E402
from neuclip.report.table import Stat, Table  # noqa: E402

ZERO_SHOT = re.compile(r"zero.?shot|^val_|^eval_", re.IGNORECASE)
YLABELS = {
    "loss": "training loss (each method's own objective;\nscales differ between methods)",
    "tau": "temperature τ (dimensionless)",
}


def training_curves(runs: list[Run], folder: Path) -> list[tuple[str, str]]:
    """One figure per (data set, scale): loss, τ and any logged zero-shot metric against step, a line per
    method (mean over seeds, band = min..max over seeds). Ablation variants are left out."""
    out = []
    default = [r for r in runs if r.variant == "default"]
    for col in sorted({r.column for r in default}, key=sort_key_column):
        frames = []
        for r in default:
            if r.column == col:
                rows = read_metrics(r)
                if rows:
                    frames.append(pd.DataFrame(rows).assign(method=r.method, name=r.method_name, run=r.path))
        if not frames:
            continue
        data = pd.concat(frames, ignore_index=True)
        keys = [k for k in ("loss", "tau") if k in data] + sorted(k for k in data if ZERO_SHOT.search(str(k)))
        if "step" not in data or not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.0), squeeze=False, layout="constrained")
        for ax, key in zip(axes[0], keys):
            for method in sorted(data["method"].unique(), key=sort_key_method):
                part = data[data["method"] == method].dropna(subset=[key])
                if part.empty:
                    continue
                stats = part.groupby("step")[key].agg(["mean", "min", "max"]).sort_index()
                n, colour = part["run"].nunique(), ERROR_COLOURS.get(part["name"].iloc[0])  # the registry's colour
                ax.plot(stats.index, stats["mean"], color=colour, label=f"{method} ({n} seed{'s' if n > 1 else ''})")
                ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2, color=colour)
            ax.set_xlabel("training step")
            ax.set_ylabel(YLABELS.get(key, f"{key} (as logged)"))
            ax.set_title(key)
            ax.grid(True, alpha=0.3)
        axes[0][-1].legend(title="method", fontsize="small")
        title = f"Training curves, {dataset_label(col[0])} [{col[1]} scale] (line = mean over seeds, band = min..max)"
        fig.suptitle(title)
        stem = folder / f"training_{col[0]}_{col[1]}"
        save(fig, stem)
        out.append((stem.name, title))
    return out


def error_training_curves(frame: pd.DataFrame, folder: Path) -> list[tuple[str, str]]:
    """Per (data set, scale): each method's own normaliser error over training (log-space MSE, log y) and the
    fraction of anchors it holds an estimate for (per-sample state covers only the samples visited so far)."""
    out = []
    if frame.empty:
        return out
    for (dataset, scale), part in frame.groupby(["dataset", "scale"], sort=False):
        fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0), squeeze=False, layout="constrained")
        for method, rows in sorted(part.groupby("method"), key=lambda kv: sort_key_method(kv[1]["label"].iloc[0])):
            n, colour = rows["run"].nunique(), ERROR_COLOURS.get(method)
            label = f"{method} ({n} seed{'s' if n > 1 else ''})"
            for ax, key in zip(axes[0], ("mse_log", "coverage")):
                stats = rows.groupby("step")[key].agg(["mean", "min", "max"]).sort_index()
                ax.plot(stats.index, stats["mean"], marker="o", color=colour, label=label)
                ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2, color=colour)
        axes[0][0].set_yscale("log")
        axes[0][0].set_ylabel("MSE of log-normaliser estimate\n(over anchors with an estimate)")
        axes[0][1].set_ylabel("fraction of anchors with an estimate")
        for ax in axes[0]:
            ax.set_xlabel("training step")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(title="method", fontsize="small")
        title = (
            f"Each method's own normaliser error during training, {dataset_label(dataset)} [{scale} scale] "
            "(line = mean over seeds, band = min..max)"
        )
        fig.suptitle(title)
        stem = folder / f"error_training_{dataset}_{scale}"
        save(fig, stem)
        out.append((stem.name, title))
    return out


def ablation_bars(table: Table, folder: Path) -> tuple[str, str] | None:
    """Bars of the table's first (main-metric) column: mean ± std over seeds, published values as markers."""
    head = table.columns[0] if table.columns else None
    cells = [(row, table.cell(row, head)) for row in table.rows]
    cells = [(row, c) for row, c in cells if isinstance(c, Stat)]
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(cells) + 2.0), 4.0), layout="constrained")
    xs = range(len(cells))
    means = [c.mean if c.n else 0.0 for _, c in cells]
    errs = [c.std or 0.0 for _, c in cells]
    bars = ax.bar(xs, means, yerr=errs, capsize=4, color="tab:green", alpha=0.8, label="ours (mean ± std)")
    for bar, (_, c) in zip(bars, cells):
        label = f"n={c.n}" if c.n else "missing"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize="x-small", xytext=(0, 2), textcoords="offset points")
    if "published" in table.columns:
        pub = [(i, table.cell(row, "published")) for i, (row, _) in enumerate(cells)]
        pts = [(i, p.value) for i, p in pub if p is not None and getattr(p, "value", None) is not None]
        if pts:
            ax.scatter([i for i, _ in pts], [v for _, v in pts], marker="D", color="black", zorder=3,
                       label="published")
    ax.set_xticks(list(xs), [row for row, _ in cells], rotation=30, ha="right")
    ax.set_ylabel(f"{head.removesuffix(' ours')} (%)")
    spans = [(m - e, m + e) for m, e, (_, c) in zip(means, errs, cells) if c.n]
    if spans:  # zoom on the bars' tops: ablation differences are small against the bars' height
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        pad = max(0.5, (hi - lo) * 0.5)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_title(f"{table.title}\n(bars: mean ± std over seeds; y axis zoomed)", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    stem = folder / table.name
    save(fig, stem)
    return stem.name, f"{table.title}: {head}"


def error_study_plots(studies: list[Study], folder: Path) -> list[tuple[str, str]]:
    out = []
    for study in studies:
        frame = pd.read_csv(study.abspath / "errors.csv")
        suffix = "" if len(studies) == 1 else f"_{study.slug}"
        where = f" ({study.path})" if len(studies) > 1 else ""
        # log-space MSE only (the primary metric, docs/method.md §6); errors.csv keeps the relative error too
        stem = folder / f"error_vs_ratio{suffix}"
        plot_error_vs_ratio(frame, stem)
        out.append((stem.name, f"Normaliser error (log-space MSE) against n/B at the final step{where}"))
        stem = folder / f"error_over_steps{suffix}"
        plot_error_over_steps(frame, stem)
        out.append((stem.name, f"Normaliser error (log-space MSE) over training{where}"))
    return out
