"""Shared maths and distributed plumbing for the estimators (docs/method.md §1).

Everything here works on the *local* anchors of this rank against the *global* batch, so that a rank's loss
is the mean over its own anchors and DDP's gradient average equals the whole-batch gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks; gradients flow back to the owning rank (summed)."""
    _, size = world()
    if size == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (equal shapes on every rank) from all ranks, without autograd."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or wider when the inputs are wider (float64 reference tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def contrast_diffs(anchors: torch.Tensor, others: torch.Tensor, offset: int) -> torch.Tensor:
    """d_ij = s_ij - s_ii for local anchors i (rows offset..offset+b of the global batch) against the other
    modality of the whole global batch `others` (B, d). d_ii is exactly 0; multiply by 1/tau to get h_ij."""
    dtype = compute_dtype(anchors)
    sim = anchors.to(dtype) @ others.to(dtype).T
    rows = torch.arange(sim.shape[0], device=sim.device)
    pos = sim[rows, rows + offset]
    return sim - pos[:, None]


def positive_mask(b: int, size: int, offset: int, device) -> torch.Tensor:
    """(b, B) boolean mask of each local anchor's own pair j == i, excluded from every normaliser."""
    rows = torch.arange(b, device=device)
    mask = torch.zeros(b, size, dtype=torch.bool, device=device)
    mask[rows, rows + offset] = True
    return mask


def log_eps_g(h: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """log(eps + g_hat_i), g_hat_i = 1/(B-1) sum_{j != i} exp(h_ij), computed as a stable log-sum-exp."""
    log_g = torch.logsumexp(h.masked_fill(mask, -math.inf), dim=1) - math.log(h.shape[1] - 1)
    return torch.logaddexp(log_g, torch.full_like(log_g, math.log(eps)))


def fcco_weights(h: torch.Tensor, mask: torch.Tensor, log_u: torch.Tensor) -> torch.Tensor:
    """Detached w_ij = exp(h_ij - log u_i) / (B-1), zero on the positive pair: sum_j w_ij grad h_ij is the
    FCCO estimate grad(g_hat_i) / u_i of grad log g_i."""
    with torch.no_grad():
        w = torch.exp(h - log_u[:, None]) / (h.shape[1] - 1)
        return w.masked_fill(mask, 0.0)


def gradient_neutral(surrogate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A tensor with `surrogate`'s gradient and `value`'s value (the method's objective estimate)."""
    return surrogate + (value - surrogate).detach()


class GlobalView:
    """This rank's anchors plus the gathered global batch (gathered with grad)."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor):
        rank, _ = world()
        self.image, self.text, self.ids = image, text, ids
        self.all_image = gather_with_grad(image)
        self.all_text = gather_with_grad(text)
        self.all_ids = gather_no_grad(ids)
        self.offset = rank * image.shape[0]
        self.size = self.all_image.shape[0]  # the global batch size B
        if self.size < 2:
            raise ValueError("contrastive estimators need a global batch of at least 2 samples")
        self.mask = positive_mask(image.shape[0], self.size, self.offset, image.device)

    def diffs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d1, d2): s_ij - s_ii for image anchors and for text anchors, (b, B) each."""
        d1 = contrast_diffs(self.image, self.all_text, self.offset)
        d2 = contrast_diffs(self.text, self.all_image, self.offset)
        return d1, d2
