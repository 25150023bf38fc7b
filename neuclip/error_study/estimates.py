"""What each method believes the log-normaliser is (docs/method.md §6.3), and how far that is from the truth.

- estimate_kind "state" (SogCLR, FastCLIP, AmorLIP, NeuCLIP): `estimator.log_normalizers(...)`.
- estimate_kind "minibatch" (OpenCLIP): log(eps + g_hat) of each anchor within a random batch of the
  training batch size, from a random partition of the data set into batches (one epoch's worth of batches).
- anything else (SigLIP: no normaliser; iSogCLR: per-sample temperatures) is not scored.
"""

from __future__ import annotations

import math

import torch

from neuclip.estimators.ops import contrast_diffs, log_eps_g, positive_mask
from neuclip.estimators.registry import SCORED_KINDS  # noqa: F401 - the one list; callers import it from here


@torch.no_grad()
def minibatch_log_normalizers(
    image, text, tau, eps, batch_size, anchors, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """log(eps + g_hat) for each anchor inside a random batch of `batch_size` drawn by a random partition."""
    return minibatch_log_normalizers_of(
        lambda ids: (image[ids], text[ids]), image.shape[0], tau, eps, batch_size, anchors, generator, image.device
    )


@torch.no_grad()
def minibatch_log_normalizers_of(
    embed, n, tau, eps, batch_size, anchors, generator, device, rows_per_call: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`minibatch_log_normalizers` for a data set given as `embed(ids) -> (image, text)` over n samples.

    Only the batches that hold an anchor are embedded (at most one per anchor, not all n), `rows_per_call`
    rows per call to `embed` (default: one batch per call). Anchors in the last n mod B slots of the partition
    (no full batch) get NaN, as before.
    """
    perm = torch.randperm(n, generator=generator).to(device)
    where = torch.empty(n, dtype=torch.long, device=device)
    where[perm] = torch.arange(n, device=device)
    anchors = anchors.to(device)
    slot = where[anchors]  # position of each anchor in the permutation
    out1 = torch.full((anchors.numel(),), math.nan, device=device)
    out2 = torch.full_like(out1, math.nan)
    full = slot < (n // batch_size) * batch_size
    batches = torch.unique(slot[full] // batch_size)  # ascending: the partition's order, as before
    per_call = max(1, (rows_per_call or batch_size) // batch_size)
    offsets = torch.arange(batch_size, device=device)
    mask = positive_mask(batch_size, batch_size, 0, device)
    for g0 in range(0, batches.numel(), per_call):
        group = batches[g0 : g0 + per_call]
        image, text = embed(perm[(group[:, None] * batch_size + offsets).reshape(-1)])
        for k, start in enumerate((group * batch_size).tolist()):
            inside = (slot >= start) & (slot < start + batch_size)
            local = slot[inside] - start
            rows = slice(k * batch_size, (k + 1) * batch_size)
            for out, anchor, other in ((out1, image[rows], text[rows]), (out2, text[rows], image[rows])):
                d = contrast_diffs(anchor, other, 0)[local]
                out[inside] = log_eps_g(d / tau, mask[local], eps).float()
    return out1, out2


def error_metrics(estimate: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Log-space MSE (primary) and mean relative error |exp(est - exact) - 1| over anchors with an estimate."""
    estimate, exact = estimate.double(), exact.double()
    have = ~torch.isnan(estimate)
    if not bool(have.any()):
        return {"mse_log": math.nan, "mean_rel_err": math.nan, "coverage": 0.0}
    diff = estimate[have] - exact[have]
    return {
        "mse_log": float((diff**2).mean()),
        "mean_rel_err": float((diff.exp() - 1).abs().mean()),
        "coverage": float(have.double().mean()),
    }


def score(estimator, image, text, ids, anchors, tau, eps, batch_size, generator, exact) -> dict[str, float] | None:
    """Per-modality and averaged error of one estimator's estimates against `exact` = (alpha1*, alpha2*)."""
    kind = estimator.estimate_kind
    if kind == "state":
        est1, est2 = estimator.log_normalizers(image[anchors], text[anchors], ids[anchors])
    elif kind == "minibatch":
        est1, est2 = minibatch_log_normalizers(image, text, tau, eps, batch_size, anchors, generator)
    else:
        return None
    return score_estimates((est1, est2), exact)


def score_estimates(estimates, exact) -> dict[str, float]:
    """The error row of estimates (alpha1_hat, alpha2_hat) against exact (alpha1*, alpha2*): per modality
    (suffix _1, _2) and the mean of the two."""
    m1, m2 = error_metrics(estimates[0], exact[0]), error_metrics(estimates[1], exact[1])
    row = {f"{k}_1": v for k, v in m1.items()} | {f"{k}_2": v for k, v in m2.items()}
    row |= {k: 0.5 * (m1[k] + m2[k]) for k in ("mse_log", "mean_rel_err", "coverage")}
    return row
