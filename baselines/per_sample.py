"""Shared machinery of the per-sample estimators (SogCLR, FastCLIP, iSogCLR): docs/method.md §3.

One log-normaliser state per sample and modality, `a_k[i] = log u_k[i]`, indexed by global sample id and
updated only for the samples in the current global batch:

    u_k[i] <- (1 - gamma) u_k[i] + gamma (eps + g_hat_k[i])      (a stable log-add-exp in log space)
    first visit of i (state still NaN): u_k[i] <- eps + g_hat_k[i]

Each rank computes g_hat for its own anchors and the values are all-gathered (no grad), so the update of every
id of the global batch is known everywhere. Where the state lives is `state_placement` (the choice docs/method.md
§3 leaves open), on the device the estimator lives on:
- `replicated` (default): every rank stores all n ids and applies the same update to the whole batch;
- `sharded`: id i is stored by rank i % world only (neuclip/estimators/sharding.py), which updates it and
  shares the new value of the batch's ids by one all-reduce; 2 n / world floats per rank, and each rank
  checkpoints its own shard (the DataComp grid uses it; the paper grid keeps the default).
Both give the state of a single-process run on the whole batch, bit for bit (the update is elementwise).
"""

from __future__ import annotations

import math

import torch

from neuclip.estimators.base import Estimator, EstimatorContext, ShardedState
from neuclip.estimators.ops import gather_no_grad, world
from neuclip.estimators.options import choice, number
from neuclip.estimators.sharding import IdShards, read_batch, share_updates

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
        "state_placement": choice("replicated", ("replicated", "sharded"),
                                  "per-sample state split across ranks by sample id, or whole on every rank",
                                  shared=True),
    }

    @classmethod
    def ids_per_rank(cls, options: dict, ctx: EstimatorContext, world: int) -> int:
        return -(-ctx.data_size // world) if options["state_placement"] == "sharded" else ctx.data_size

    @classmethod
    def state_bytes(cls, options: dict, ctx: EstimatorContext, world: int = 1) -> int:
        return 2 * DTYPES[options["state_dtype"]].itemsize * cls.ids_per_rank(options, ctx, world)  # a1, a2

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        super().__init__(cfg, ctx)
        if ctx.data_size <= 0:
            raise ValueError(f"{self.name}: needs data_size (max sample id + 1) > 0, got {ctx.data_size}")
        rank, size = world()  # the process group must exist before the estimator is built
        self.layout = IdShards(rank, size, ctx.data_size) if cfg["state_placement"] == "sharded" else IdShards(
            0, 1, ctx.data_size)
        self.fills = {"a1": math.nan, "a2": math.nan}
        dtype = DTYPES[cfg["state_dtype"]]
        self.register_buffer("a1", torch.full((self.layout.size,), math.nan, dtype=dtype))
        self.register_buffer("a2", torch.full((self.layout.size,), math.nan, dtype=dtype))

    def sharded_state(self) -> ShardedState:
        # replicated state is the 1-rank layout: one file (rank 0 writes it) that every rank memory-maps
        return ShardedState(dict(self.fills), self.layout.rank, self.layout.world, self.layout.data_size)

    def _check_layout(self) -> None:
        if self.layout.world > 1 and self.layout.world != world()[1]:
            raise RuntimeError(f"{self.name}: state sharded over {self.layout.world} ranks, but this process "
                               f"group has {world()[1]}: build the estimator after joining the process group")

    def gamma(self, epoch: float) -> float:
        if self.cfg["gamma_schedule"] == "constant":
            return float(self.cfg["gamma"])
        gamma_min = self.cfg["gamma_min"]
        if gamma_min is None:
            gamma_min = default_gamma_min(self.ctx.total_epochs)
        decay = self.cfg["gamma_decay_epochs"] or self.ctx.total_epochs
        return cosine_gamma(epoch, gamma_min, decay)

    def check_ids(self, ids: torch.Tensor) -> None:
        n = self.layout.data_size
        bad = (ids < 0) | (ids >= n)
        if bool(bad.any()):
            raise IndexError(
                f"{self.name}: sample id {int(ids[bad][0])} outside [0, data_size={n}); "
                "set data.data_size to at least the largest sample id + 1"
            )

    @torch.no_grad()
    def update_state(self, view, log_g1: torch.Tensor, log_g2: torch.Tensor, gamma: float):
        """Apply the moving average for the whole global batch; return the new (a1, a2) of local anchors."""
        self.check_ids(view.all_ids)
        self._check_layout()
        b = log_g1.shape[0]
        local = slice(view.offset, view.offset + b)
        ids = view.all_ids.to(self.a1.device)
        own = self.layout.owned(ids)
        slots = self.layout.slots(ids[own])
        new = torch.zeros(2, ids.numel(), dtype=self.a1.dtype, device=self.a1.device)
        for k, (state, log_g) in enumerate(((self.a1, log_g1), (self.a2, log_g2))):
            all_log_g = gather_no_grad(log_g.detach())[own.to(log_g.device)]
            updated = moving_average_log(state[slots].to(all_log_g.dtype), all_log_g, gamma).to(state.dtype)
            state[slots] = updated
            new[k, own] = updated
        # Use the values as stored, so every rank and every resume sees the same numbers.
        new = share_updates(self.layout, new)[:, local].to(log_g1.device, log_g1.dtype)
        return new[0], new[1]

    @torch.no_grad()
    def log_normalizers(self, image, text, ids):
        """Collective when the state is sharded over several ranks: every rank passes the same ids."""
        self._check_layout()
        a = read_batch(self.layout, [self.a1, self.a2], ids.to(self.a1.device))
        return a[0].float(), a[1].float()
