"""One driver run: a method trains its *own* encoder on the synthetic paired features, through the trainer's
own step (neuclip/train/step.py: AdamW groups, warmup and cosine, the temperature's schedule, projection), and
is scored afterwards (docs/methods.md, "The driver study").

Data: error_study/synthetic.py's clustered pairs, ids 0..n-1 for training; held-out pairs are ids n..n+H-1
(fresh draws of the same distribution). Encoder: the error study's two MLP towers. Scores:
- retrieval on the held-out pairs: i2t and t2i top-1 (chance 1/H);
- zero-shot over the clusters: each cluster's noise-free text (its centre through the text map) embedded by the
  text tower is the class prompt; held-out images classified by cosine (chance 1/clusters);
- the final tau (the method's reported temperature);
- the error of the method's own normaliser estimate against the exact one, at the final tau, for `anchors`
  fixed anchors against all n (error_study/shadow.measure: the same scoring as the shadow sweep);
- wall and CPU seconds of training and of scoring.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuclip.error_study.shadow import PairEncoder, ShadowRun, measure
from neuclip.error_study.synthetic import ClusteredPairs, stream_seed
from neuclip.estimators import EstimatorContext, build_estimator
from neuclip.estimators.registry import SCORED_KINDS, estimator_class
from neuclip.train.optim import build_optimizer
from neuclip.train.step import Stepper


@dataclass
class DriverRun:
    method: str
    n: int
    batch_size: int
    steps: int
    seed: int = 0
    fixed_tau: float | None = None  # None: the method learns its temperature as it ships
    options: dict = field(default_factory=dict)  # the method's options (rho from the data set's rule)
    dim_in: int = 64
    dim: int = 32
    clusters: int = 64
    noise: float = 0.6
    lr: float = 2e-3
    warmup_steps: int = 50  # at most a tenth of the run (a one-epoch run at n/B = 10 is 10 steps)
    heldout: int = 1024
    anchors: int = 1024


def fixed_tau_options(method: str, tau: float) -> dict:
    """Options that pin a method's temperature at `tau` for the whole run (the fixed-tau grid points)."""
    keys = estimator_class(method).defaults
    if "logit_scale_init" in keys:  # SigLIP: scale = 1/tau, its lr (with the bias's) at 0
        return {"logit_scale_init": math.log(1.0 / tau), "lr_logit_scale": 0.0}
    out = {"tau_init": tau}
    for lr_key in ("lr_tau", "tau_lr"):  # a global tau's AdamW group, or iSogCLR's per-sample Adam
        if lr_key in keys:
            out[lr_key] = 0.0
    if "learn_tau" in keys:
        out["learn_tau"] = False
    return out


def _zero_shot_prompts(data: ClusteredPairs) -> torch.Tensor:
    """Each cluster's noise-free text features: its centre through the text map."""
    return data.centres @ data.mix


def run(cfg: DriverRun) -> dict:
    """Train and score one run; one result row."""
    started, cpu_started = time.perf_counter(), time.process_time()
    data, encoder, estimator, options, tau_path = train(cfg)
    train_s, train_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    row = {"method": cfg.method, "label": estimator_class(cfg.method).label_for(options), "n": cfg.n,
           "batch_size": cfg.batch_size, "n_over_b": cfg.n / cfg.batch_size, "steps": cfg.steps,
           "epochs": cfg.steps / (cfg.n // cfg.batch_size), "seed": cfg.seed,
           "tau_mode": "learned" if cfg.fixed_tau is None else f"fixed {cfg.fixed_tau:g}",
           "rho": options.get("rho"), "final_tau": estimator.temperature(), "tau_path": tau_path}
    t0, c0 = time.perf_counter(), time.process_time()
    encoder.eval()
    row |= _downstream(cfg, data, encoder)
    row |= _own_error(cfg, data, encoder, estimator)
    row |= {"train_s": train_s, "train_cpu_s": train_cpu, "score_s": time.perf_counter() - t0,
            "score_cpu_s": time.process_time() - c0}
    return row


def train(cfg: DriverRun):
    """(data, the trained encoder, the estimator, its options, tau every 5 % of the run)."""
    data = ClusteredPairs(cfg.seed, cfg.dim_in, cfg.clusters, cfg.noise)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, "encoder"))
        encoder = PairEncoder(cfg.dim_in, cfg.dim)
    spe = cfg.n // cfg.batch_size
    ctx = EstimatorContext(embed_dim=cfg.dim, data_size=cfg.n, num_samples=cfg.n, total_epochs=cfg.steps / spe,
                           total_steps=cfg.steps, steps_per_epoch=spe)
    options = {**cfg.options, **(fixed_tau_options(cfg.method, cfg.fixed_tau) if cfg.fixed_tau else {})}
    if "seed" in estimator_class(cfg.method).defaults:
        options.setdefault("seed", cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, "estimator"))
        estimator = build_estimator(cfg.method, options, ctx)
    train = {"lr": cfg.lr, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "grad_clip": None,
             "warmup_steps": min(cfg.warmup_steps, cfg.steps // 10)}
    optimizer = build_optimizer(encoder, estimator, train)
    step_fn = Stepper(encoder, estimator, optimizer, cfg={"train": train, "data": {"data_size": cfg.n}}, world=1,
                      device=torch.device("cpu"), bf16=False, total_steps=cfg.steps, steps_per_epoch=spe,
                      ckpt_dir=Path("(driver run: no checkpoints)"))
    order_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, "order"))
    order = torch.empty(0, dtype=torch.long)
    tau_path = []
    for step in range(cfg.steps):
        if step % spe == 0:
            estimator.on_epoch_start(step // spe)
            order = torch.randperm(cfg.n, generator=order_gen)[: spe * cfg.batch_size]
        ids = order[(step % spe) * cfg.batch_size:(step % spe + 1) * cfg.batch_size]
        x, y = data.features(ids)
        step_fn(x, y, ids, step, lambda: False)
        if (step + 1) % max(1, cfg.steps // 20) == 0:
            tau_path.append(round(estimator.temperature(), 5))
    return data, encoder, estimator, options, tau_path


@torch.no_grad()
def _downstream(cfg: DriverRun, data: ClusteredPairs, encoder: PairEncoder) -> dict:
    ids = torch.arange(cfg.n, cfg.n + cfg.heldout)
    image, text = encoder(*data.features(ids))
    sim = image @ text.T
    truth = torch.arange(cfg.heldout)
    prompts = _zero_shot_prompts(data)
    _, classes = encoder(prompts, prompts)  # the text tower on each cluster's prompt (the image half is unused)
    predicted = (image @ classes.T).argmax(1)
    return {"i2t_top1": float((sim.argmax(1) == truth).double().mean()),
            "t2i_top1": float((sim.argmax(0) == truth).double().mean()),
            "zero_shot_top1": float((predicted == data.labels(ids)).double().mean()),
            "chance_retrieval": 1.0 / cfg.heldout, "chance_zero_shot": 1.0 / cfg.clusters}


@torch.no_grad()
def _own_error(cfg: DriverRun, data: ClusteredPairs, encoder: PairEncoder, estimator) -> dict:
    """The method's own estimate at its final tau against the exact normaliser (NaN where it has none)."""
    if estimator.estimate_kind not in SCORED_KINDS:
        return {"mse_log": math.nan, "mean_rel_err": math.nan, "coverage": math.nan}
    anchor_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, "anchors"))
    anchors = torch.randperm(cfg.n, generator=anchor_gen)[: min(cfg.anchors, cfg.n)]
    probe = ShadowRun(n=cfg.n, batch_size=cfg.batch_size, steps=cfg.steps, seed=cfg.seed,
                      tau=estimator.temperature(), dim_in=cfg.dim_in, dim=cfg.dim, clusters=cfg.clusters,
                      noise=cfg.noise, anchors=anchors.numel(), driver=cfg.method, shadows={})
    rows = measure(probe, data, encoder, {cfg.method: estimator}, anchors, math.nan, cfg.steps)
    return {k: rows[0][k] for k in ("mse_log", "mean_rel_err", "coverage", "alpha_star_mean")}
