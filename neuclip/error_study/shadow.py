"""Shadow-estimator runs: one training trajectory, every estimator fed the same embeddings (METHOD.md §6).

A small pair of MLP encoders is trained on synthetic clustered image/text features by a *driver* method. On
every batch, each *shadow* estimator (the real classes from the registry) also runs its inner block on the
same detached embeddings; its loss is discarded. At chosen steps, all n pairs are embedded, the exact
alpha* is computed for a fixed anchor subset, and each shadow's estimate is scored against it. So the error
measured is estimation error alone, separated from each method's effect on training, and at a matched step
budget (a larger n/B does not mean more steps). The temperature is fixed and shared by every estimator.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from neuclip.error_study.estimates import SCORED_KINDS, score
from neuclip.error_study.exact import exact_log_normalizers
from neuclip.estimators import Batch, EstimatorContext, build_estimator
from neuclip.estimators.registry import estimator_class

DEFAULT_SHADOWS = {
    "openclip": {},
    "sogclr": {"gamma": 0.9},
    "fastclip": {},
    "amorlip": {},
    "neuclip": {"num_prototypes": 256},
}


@dataclass
class ShadowRun:
    n: int
    batch_size: int
    steps: int
    seed: int = 0
    measure_at: list[int] = field(default_factory=list)  # steps after which to measure; default: the last
    tau: float = 0.07
    eps: float = 1e-14
    dim_in: int = 64
    dim: int = 32
    clusters: int = 64
    noise: float = 0.6
    lr: float = 2e-3
    anchors: int = 2048
    driver: str = "openclip"
    shadows: dict[str, dict] = field(default_factory=lambda: dict(DEFAULT_SHADOWS))


def clustered_pairs(n: int, dim_in: int, clusters: int, noise: float, gen: torch.Generator):
    """Image/text features sharing a cluster (a 'concept') plus per-sample noise; text through another map."""
    centres = torch.randn(clusters, dim_in, generator=gen)
    mix = torch.randn(dim_in, dim_in, generator=gen) / math.sqrt(dim_in)
    label = torch.randint(clusters, (n,), generator=gen)
    shared = centres[label] + noise * torch.randn(n, dim_in, generator=gen)
    image = shared + noise * torch.randn(n, dim_in, generator=gen)
    text = shared @ mix + noise * torch.randn(n, dim_in, generator=gen)
    return image, text


class PairEncoder(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(dim_in, 128), nn.GELU(), nn.Linear(128, dim))
        self.text = nn.Sequential(nn.Linear(dim_in, 128), nn.GELU(), nn.Linear(128, dim))

    def forward(self, x, y):
        return F.normalize(self.image(x), dim=1), F.normalize(self.text(y), dim=1)


def _fixed_tau(method: str, options: dict, tau: float) -> dict:
    """Options that pin the method's temperature to `tau` (it is never stepped in a shadow role anyway)."""
    keys = estimator_class(method).defaults
    if "tau_init" in keys:
        options = {**options, "tau_init": tau}
    if "learn_tau" in keys:
        options = {**options, "learn_tau": False}
    return options


def run(cfg: ShadowRun, progress=None) -> list[dict]:
    """Train the driver for `cfg.steps` and return one row per (measurement step, shadow method)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    image_x, text_x = clustered_pairs(cfg.n, cfg.dim_in, cfg.clusters, cfg.noise, gen)
    ids = torch.arange(cfg.n)
    steps_per_epoch = max(1, cfg.n // cfg.batch_size)
    ctx = EstimatorContext(
        embed_dim=cfg.dim,
        data_size=cfg.n,
        total_epochs=cfg.steps / steps_per_epoch,
        total_steps=cfg.steps,
        steps_per_epoch=steps_per_epoch,
    )
    encoder = PairEncoder(cfg.dim_in, cfg.dim)
    driver = build_estimator(cfg.driver, _fixed_tau(cfg.driver, {}, cfg.tau), ctx)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    shadows = {m: build_estimator(m, _fixed_tau(m, o, cfg.tau), ctx) for m, o in cfg.shadows.items()}
    measure_at = sorted(set(cfg.measure_at or [cfg.steps]))
    anchors = torch.randperm(cfg.n, generator=gen)[: min(cfg.anchors, cfg.n)]
    rows, order, started = [], torch.empty(0, dtype=torch.long), time.time()
    for step in range(cfg.steps):
        if order.numel() < cfg.batch_size:  # a new epoch: a fresh seeded permutation
            epoch = step // steps_per_epoch
            for est in (driver, *shadows.values()):
                est.on_epoch_start(epoch)
            order = torch.randperm(cfg.n, generator=gen)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        img, txt = encoder(image_x[idx], text_x[idx])
        epoch_f = step / steps_per_epoch
        loss = driver(Batch(img, txt, ids[idx], step, epoch_f)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for est in shadows.values():
                est(Batch(img.detach(), txt.detach(), ids[idx], step, epoch_f))
        if step + 1 in measure_at:
            rows += _measure(cfg, encoder, shadows, image_x, text_x, ids, anchors, step + 1, gen)
            if progress:
                progress(f"n={cfg.n} B={cfg.batch_size} seed={cfg.seed} step {step + 1}: {time.time() - started:.0f}s")
    return rows


@torch.no_grad()
def _measure(cfg, encoder, shadows, image_x, text_x, ids, anchors, step, gen) -> list[dict]:
    image, text = encoder(image_x, text_x)
    exact = exact_log_normalizers(image, text, cfg.tau, cfg.eps, anchors=anchors, accumulate="float64")
    rows = []
    for method, est in shadows.items():
        if est.estimate_kind not in SCORED_KINDS:
            continue
        errs = score(est, image, text, ids, anchors, cfg.tau, cfg.eps, cfg.batch_size, gen, exact)
        rows.append(
            {
                "method": method,
                "n": cfg.n,
                "batch_size": cfg.batch_size,
                "n_over_b": cfg.n / cfg.batch_size,
                "seed": cfg.seed,
                "step": step,
                "steps": cfg.steps,
                "alpha_star_mean": float(torch.cat(exact).mean()),
                **errs,
            }
        )
    return rows
