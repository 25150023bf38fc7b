"""Exact log-normalisers over a whole data set by a streaming pass (METHOD.md §6.2).

    alpha1*_i = log(eps + 1/(n-1) sum_{j != i} exp((e1_i . e2_j - e1_i . e2_i) / tau))     (image anchors)
    alpha2*_i = log(eps + 1/(n-1) sum_{j != i} exp((e2_i . e1_j - e2_i . e1_i) / tau))     (text anchors)

Anchors are processed in blocks against column chunks of the other modality with a running log-sum-exp, so
memory is O(anchor_block x chunk), never n x n. Each chunk's matmul runs in the embeddings' dtype (the hot path);
the running log-sum-exp can be kept in float64 (`accumulate="float64"`) for long sums.
"""

from __future__ import annotations

import math

import torch

ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}


@torch.no_grad()
def exact_log_normalizers(
    image: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    eps: float,
    anchors: torch.Tensor | None = None,
    chunk: int = 8192,
    anchor_block: int = 1024,
    accumulate: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha1*, alpha2*) for `anchors` (indices into the n rows; default all), each (a,) in `accumulate`."""
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(
            f"image and text embeddings must both be (n, d); got {tuple(image.shape)}, {tuple(text.shape)}"
        )
    n = image.shape[0]
    if n < 2:
        raise ValueError("the exact normaliser needs at least 2 samples")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {list(ACCUMULATE)}, got {accumulate!r}")
    acc = torch.promote_types(ACCUMULATE[accumulate], image.dtype)  # never narrower than the inputs
    if anchors is None:
        anchors = torch.arange(n, device=image.device)
    anchors = anchors.to(image.device)
    out1, out2 = [], []
    for start in range(0, anchors.numel(), anchor_block):
        idx = anchors[start : start + anchor_block]
        pos = (image[idx] * text[idx]).sum(1)
        out1.append(_block(image[idx], text, idx, pos, tau, chunk, acc))
        out2.append(_block(text[idx], image, idx, pos, tau, chunk, acc))
    log_eps = math.log(eps)
    a1, a2 = torch.cat(out1), torch.cat(out2)
    norm = math.log(n - 1)
    return (
        torch.logaddexp(a1 - norm, torch.full_like(a1, log_eps)),
        torch.logaddexp(a2 - norm, torch.full_like(a2, log_eps)),
    )


def _block(anchor, others, idx, pos, tau, chunk, acc) -> torch.Tensor:
    """log sum_{j != i} exp((anchor_i . others_j - pos_i) / tau) for one block of anchors.

    The 1/tau scale goes on the (a x d) anchors rather than the (a x chunk) logits, and pos_i / tau is
    subtracted once at the end (log-sum-exp is shift-equivariant): the hot loop is one matmul and one
    in-place log-sum-exp per chunk, with no extra passes over the logits.
    """
    scaled = anchor / tau
    running = torch.full((anchor.shape[0],), -math.inf, dtype=acc, device=anchor.device)
    rows = torch.arange(anchor.shape[0], device=anchor.device)
    for c0 in range(0, others.shape[0], chunk):
        logits = scaled @ others[c0 : c0 + chunk].T
        own = (idx >= c0) & (idx < c0 + chunk)  # the positive pair j == i lies in this chunk
        if bool(own.any()):
            logits[rows[own], idx[own] - c0] = -math.inf
        running = torch.logaddexp(running, _logsumexp_(logits).to(acc))
    return running - (pos / tau).to(acc)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp that overwrites `logits` (about 10 % faster on CPU than torch.logsumexp, which
    allocates two more a x chunk temporaries). A row that is all -inf gives -inf, not nan."""
    top = logits.amax(dim=1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)
    return logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
