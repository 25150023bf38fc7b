"""The metrics clip_benchmark does not compute but DataComp's main metrics need.

WILDS / fairness group metrics (DataComp `eval_utils/wilds_eval.py`, `fairness_eval.py`, which call the `wilds`
package) and the WinoGAViL Jaccard score (`eval_utils/wino_eval.py`), re-implemented on numpy so the harness
does not depend on `wilds` (and its torch_scatter) or on DataComp's stale package. Each function names the
DataComp code it mirrors; the keys it returns are DataComp's, so `main_metric` lookups match tasklist.yml.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, jaccard_score, recall_score


def group_means(values: np.ndarray, groups: np.ndarray) -> dict[int, float]:
    """Mean of `values` in each group that has members (WILDS `compute_group_wise`; empty groups are skipped,
    and DataComp's evaluators set no metadata_map, so no group is excluded by name, "Other" included)."""
    groups = np.asarray(groups).astype(np.int64)
    return {int(g): float(np.mean(values[groups == g])) for g in np.unique(groups)}


def worst_group(values: np.ndarray, groups: np.ndarray) -> float:
    return min(group_means(values, groups).values())


def wilds_metrics(recipe: str, logits: np.ndarray, labels: np.ndarray, metadata: np.ndarray) -> dict[str, float]:
    """DataComp's extra metrics for one WILDS / fairness set, from logits (N, C), labels (N,), metadata (N, d).

    Metadata columns are the order the sets' .npy files store them (DataComp's `_metadata_fields`):
    fmow [region, year, y]; dollar_street [income_ds, income_meta, region]; geode [region, country].
    """
    logits, labels, metadata = np.asarray(logits), np.asarray(labels).astype(np.int64), np.asarray(metadata)
    pred = logits.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    if recipe == "iwildcam":  # IWildCamEvaluator: Accuracy, Recall(macro), F1(macro) over the labels present
        present = np.unique(labels)
        return {
            "acc_avg": float(correct.mean()),
            "recall-macro_all": float(recall_score(labels, pred, average="macro", labels=present, zero_division=0)),
            "F1-macro_all": float(f1_score(labels, pred, average="macro", labels=present, zero_division=0)),
        }
    if recipe == "fmow":  # FMoWEvaluator: accuracy by year (worst -> acc_worst_year), worst region
        out = {"acc_avg": float(correct.mean()), "acc_worst_year": worst_group(correct, metadata[:, 1])}
        for g, acc in group_means(correct, metadata[:, 0]).items():
            out[f"acc_region:{g}"] = acc
        out["acc_worst_region"] = worst_group(correct, metadata[:, 0])
        return out
    if recipe == "dollar_street":  # DollarStreetEvaluator: top-5 accuracy, worst income_ds group
        k = min(5, logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        hit = (top == labels[:, None]).any(axis=1).astype(np.float64)
        return {"acc_top5_avg": float(hit.mean()), "acc_top5_wg": worst_group(hit, metadata[:, 0])}
    if recipe == "geode":  # GeoDEEvaluator: top-1 accuracy, worst region
        return {"acc_avg": float(correct.mean()), "acc_wg": worst_group(correct, metadata[:, 0])}
    raise KeyError(f"unknown WILDS recipe {recipe!r}")


def winogavil_prompt(cue: str) -> str:
    """DataComp's `get_clip_prompt`: 'A <cue>' / 'An <cue>' (lower-cased cue)."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in "aeiou" and cue else f"A {cue}"


def winogavil_instance_score(similarities: np.ndarray, y_true: np.ndarray) -> float:
    """Jaccard index of the top-k candidates (k = number of true associations) against the true ones."""
    n_assoc = int(np.sum(y_true))
    top = np.argsort(similarities)[-n_assoc:]  # as DataComp (k = 0 would select all; never happens in the data)
    y_pred = np.isin(np.arange(len(similarities)), top)
    return float(jaccard_score(np.asarray(y_true, dtype=bool), y_pred))


def winogavil_metrics(scores, n_candidates) -> dict[str, float]:
    """DataComp's WinoGAViL summary: mean Jaccard over all instances and by candidate count (5, 6, 10, 12)."""
    scores, n = np.asarray(scores, dtype=np.float64), np.asarray(n_candidates)

    def mean(mask) -> float:
        return float(scores[mask].mean()) if mask.any() else float("nan")

    return {
        "avg_jaccard_score": mean(np.ones_like(n, dtype=bool)),
        "jaccard_score_5": mean(n == 5),
        "jaccard_score_6": mean(n == 6),
        "jaccard_score_10": mean(n == 10),
        "jaccard_score_12": mean(n == 12),
        "jaccard_score_5-6": mean(n <= 6),
        "jaccard_score_10-12": mean(n >= 10),
    }
