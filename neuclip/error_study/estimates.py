"""What each method believes the log-normaliser is (METHOD.md §6.3), and how far that is from the truth.

- estimate_kind "state" (SogCLR, FastCLIP, AmorLIP, NeuCLIP): `estimator.log_normalizers(...)`.
- estimate_kind "minibatch" (OpenCLIP): log(eps + g_hat) of each anchor within a random batch of the
  training batch size, from a random partition of the data set into batches (one epoch's worth of batches).
- anything else (SigLIP: no normaliser; iSogCLR: per-sample temperatures) is not scored.
"""

from __future__ import annotations

import math

import torch

from neuclip.estimators.ops import contrast_diffs, log_eps_g, positive_mask

SCORED_KINDS = ("state", "minibatch")


@torch.no_grad()
def minibatch_log_normalizers(
    image, text, tau, eps, batch_size, anchors, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """log(eps + g_hat) for each anchor inside a random batch of `batch_size` drawn by a random partition."""
    n = image.shape[0]
    perm = torch.randperm(n, generator=generator).to(image.device)
    where = torch.empty(n, dtype=torch.long, device=image.device)
    where[perm] = torch.arange(n, device=image.device)
    out1 = torch.full((anchors.numel(),), math.nan, device=image.device)
    out2 = torch.full_like(out1, math.nan)
    slot = where[anchors]  # position of each anchor in the permutation
    for start in range(0, n - batch_size + 1, batch_size):
        members = perm[start : start + batch_size]
        inside = (slot >= start) & (slot < start + batch_size)
        if not bool(inside.any()):
            continue
        local = slot[inside] - start
        for out, anchor, other in ((out1, image, text), (out2, text, image)):
            d = contrast_diffs(anchor[members], other[members], 0)[local]
            mask = positive_mask(batch_size, batch_size, 0, image.device)[local]
            out[inside] = log_eps_g(d / tau, mask, eps).float()
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
    m1, m2 = error_metrics(est1, exact[0]), error_metrics(est2, exact[1])
    row = {f"{k}_1": v for k, v in m1.items()} | {f"{k}_2": v for k, v in m2.items()}
    row |= {k: 0.5 * (m1[k] + m2[k]) for k in ("mse_log", "mean_rel_err", "coverage")}
    return row
