"""The driver study's plots; method colours and labels from the registry (each estimator class declares them)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from neuclip.error_study.plots import save  # noqa: E402
from neuclip.estimators.registry import colours  # noqa: E402


def plot_accuracy(table: pd.DataFrame, out: Path, metric: str = "i2t_top1") -> None:
    """accuracy_vs_ratio: a panel per (budget, B), accuracy against n/B (log axis), a line per method with its
    t-interval as a band; accuracy_vs_batch: a panel per (budget, n/B), accuracy against B."""
    learned = table[table["tau_mode"] == "learned"]
    colour = colours()
    for x, panel, stem in (("n_over_b", "batch_size", "accuracy_vs_ratio"), ("batch_size", "n_over_b",
                                                                            "accuracy_vs_batch")):
        budgets = sorted(learned["budget"].unique())
        panels = sorted(learned[panel].unique())
        fig, axes = plt.subplots(len(budgets), len(panels), figsize=(3.2 * len(panels), 2.8 * len(budgets)),
                                 squeeze=False, sharey=True, layout="constrained")
        for i, budget in enumerate(budgets):
            for j, p in enumerate(panels):
                ax = axes[i][j]
                part = learned[(learned["budget"] == budget) & (learned[panel] == p)]
                for method, line in part.groupby("method"):
                    line = line.sort_values(x)
                    ci = line[f"{metric}_ci"].fillna(0.0)
                    ax.plot(line[x], line[metric], marker="o", ms=3, color=colour.get(method),
                            label=line["label"].iloc[0])
                    ax.fill_between(line[x], line[metric] - ci, line[metric] + ci, color=colour.get(method),
                                    alpha=0.15, lw=0)
                ax.set_xscale("log", base=10 if x == "n_over_b" else 2)
                ax.set_title(f"{budget}, {'B' if panel == 'batch_size' else 'n/B'} {p:g}", fontsize="small")
                ax.set_xlabel("n/B" if x == "n_over_b" else "global batch B")
                ax.grid(alpha=0.3)
            axes[i][0].set_ylabel(metric.replace("_", " "))
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
        fig.suptitle(f"Driver study: {metric.replace('_', ' ')} (mean over seeds, 95 % t-interval)")
        save(fig, out / stem)
