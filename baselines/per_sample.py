"""Shared machinery of the per-sample estimators (SogCLR, FastCLIP, iSogCLR): docs/method.md §3.

One log-normaliser state per sample and modality, `a_k[i] = log u_k[i]`, indexed by global sample id and
updated only for the samples in the current global batch:

    u_k[i] <- (1 - gamma) u_k[i] + gamma (eps + g_hat_k[i])      (a stable log-add-exp in log space)
    first visit of i (state still NaN): u_k[i] <- eps + g_hat_k[i]

State is replicated on every rank: each rank computes g_hat for its own anchors, the values are all-gathered
(no grad) and every rank applies the same update to all ids of the global batch, so the state is identical
across ranks and equal to a single-process run on the whole batch (the choice docs/method.md §3 leaves open;
2 n floats per rank, on the device the estimator lives on).
"""

from __future__ import annotations

import math

import torch

from neuclip.estimators.base import Estimator, EstimatorContext
from neuclip.estimators.ops import gather_no_grad
from neuclip.estimators.options import choice, number

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def cosine_gamma(epoch: float, gamma_min: float, decay_epochs: float) -> float:
    """FastCLIP's schedule on the integer epoch E: 1/2 (1 + cos(pi E / E_decay)) (1 - g_min) + g_min until
    E_decay, g_min afterwards. It gives gamma = 1 throughout epoch 0."""
    e = math.floor(epoch)
    if e >= decay_epochs:
        return gamma_min
    return 0.5 * (1.0 + math.cos(math.pi * e / decay_epochs)) * (1.0 - gamma_min) + gamma_min


def default_gamma_min(total_epochs: float) -> float:
    """The FastCLIP group's later guidance: gamma_min = min(1, 4.177 * E_total^-0.7265)."""
    return min(1.0, 4.177 * max(total_epochs, 1.0) ** -0.7265)


@torch.no_grad()
def moving_average_log(a_old: torch.Tensor, log_target: torch.Tensor, gamma: float) -> torch.Tensor:
    """log((1 - gamma) exp(a_old) + gamma exp(log_target)); a_old NaN (never visited) -> log_target."""
    log_keep = math.log1p(-gamma) if gamma < 1.0 else -math.inf
    log_gamma = math.log(gamma) if gamma > 0.0 else -math.inf
    mixed = torch.logaddexp(a_old + log_keep, log_target + log_gamma)
    return torch.where(torch.isnan(a_old), log_target, mixed)


class PerSampleEstimator(Estimator):
    """Holds a1, a2 (log u per sample) and the gamma schedule; subclasses define the objective."""

    estimate_kind = "state"
    common_options = {
        "eps": number(1e-14, "epsilon inside log(eps + g)", exclusive_minimum=0, shared=True),
        "gamma_schedule": choice("constant", ("constant", "cosine"), "gamma schedule of the moving average"),
        "gamma": number(0.9, "constant schedule: the moving-average weight", exclusive_minimum=0, maximum=1),
        "gamma_min": number(None, "cosine schedule: final gamma; null = min(1, 4.177 E_total^-0.7265)",
                            exclusive_minimum=0, maximum=1, nullable=True, shared=True),
        "gamma_decay_epochs": number(None, "cosine schedule: epochs of the decay; null = total epochs",
                                     exclusive_minimum=0, nullable=True, shared=True),
        "state_dtype": choice("float32", tuple(DTYPES), "dtype of the per-sample state"),
    }

    @classmethod
    def state_bytes(cls, options: dict, ctx: EstimatorContext) -> int:
        return 2 * DTYPES[options["state_dtype"]].itemsize * ctx.data_size  # a1, a2

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        super().__init__(cfg, ctx)
        if ctx.data_size <= 0:
            raise ValueError(f"{self.name}: needs data_size (max sample id + 1) > 0, got {ctx.data_size}")
        dtype = DTYPES[cfg["state_dtype"]]
        self.register_buffer("a1", torch.full((ctx.data_size,), math.nan, dtype=dtype))
        self.register_buffer("a2", torch.full((ctx.data_size,), math.nan, dtype=dtype))

    def gamma(self, epoch: float) -> float:
        if self.cfg["gamma_schedule"] == "constant":
            return float(self.cfg["gamma"])
        gamma_min = self.cfg["gamma_min"]
        if gamma_min is None:
            gamma_min = default_gamma_min(self.ctx.total_epochs)
        decay = self.cfg["gamma_decay_epochs"] or self.ctx.total_epochs
        return cosine_gamma(epoch, gamma_min, decay)

    def check_ids(self, ids: torch.Tensor) -> None:
        bad = (ids < 0) | (ids >= self.a1.shape[0])
        if bool(bad.any()):
            raise IndexError(
                f"{self.name}: sample id {int(ids[bad][0])} outside [0, data_size={self.a1.shape[0]}); "
                "set data.data_size to at least the largest sample id + 1"
            )

    @torch.no_grad()
    def update_state(self, view, log_g1: torch.Tensor, log_g2: torch.Tensor, gamma: float):
        """Apply the moving average for the whole global batch; return the new (a1, a2) of local anchors."""
        self.check_ids(view.all_ids)
        b = log_g1.shape[0]
        local = slice(view.offset, view.offset + b)
        new = []
        for state, log_g in ((self.a1, log_g1), (self.a2, log_g2)):
            all_log_g = gather_no_grad(log_g.detach())
            ids = view.all_ids.to(state.device)
            updated = moving_average_log(state[ids].to(all_log_g.dtype), all_log_g, gamma).to(state.dtype)
            state[ids] = updated
            # Use the values as stored, so every rank and every resume sees the same numbers.
            new.append(updated[local].to(log_g.device, log_g.dtype))
        return new[0], new[1]

    @torch.no_grad()
    def log_normalizers(self, image, text, ids):
        ids = ids.to(self.a1.device)
        return self.a1[ids].float(), self.a2[ids].float()
