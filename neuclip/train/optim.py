"""AdamW parameter groups and the cosine-with-linear-warmup schedule.

The schedule is a pure function of the step (as open_clip's `cosine_lr`), so resuming needs only the step.
Each group keeps its own `base_lr`; every step sets lr = base_lr * schedule(step) * the estimator's factor
for that group (FastCLIP's lr_tau / 3 while tau <= 0.03, for instance). A group an estimator declares with
`follows_model_schedule: False` (the public `step_thresh` temperature) takes no schedule multiplier: its lr is
base_lr * factor, constant but for the factor.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip's rule: gains, biases, norms, logit scale and every ndim < 2 tensor get no weight decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: nn.Module, estimator, train_cfg: dict) -> torch.optim.AdamW:
    lr, wd = float(train_cfg["lr"]), float(train_cfg["weight_decay"])
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": wd, "base_lr": lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "base_lr": lr},
    ]
    seen = {id(p) for g in groups for p in g["params"]}
    for g in estimator.param_groups():
        params = [p for p in g["params"] if p.requires_grad]
        if any(id(p) in seen for p in params):
            raise ValueError(f"estimator group {g.get('name')!r} repeats a parameter already being optimised")
        seen.update(id(p) for p in params)
        group = {k: v for k, v in g.items() if k not in ("params", "lr")}
        group.update(
            params=params,
            name=str(g.get("name", f"estimator{len(groups)}")),
            weight_decay=float(g.get("weight_decay", 0.0)),
            base_lr=float(g["lr"]) if g.get("lr") is not None else lr,
        )
        groups.append(group)
    groups = [g for g in groups if g["params"]]
    betas = tuple(float(b) for b in train_cfg["betas"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=float(train_cfg["eps"]))


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine to 0 at `total_steps` (open_clip's cosine_lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float, factors: dict[str, float]) -> None:
    for g in optimizer.param_groups:
        scale = multiplier if g.get("follows_model_schedule", True) else 1.0
        g["lr"] = g["base_lr"] * scale * float(factors.get(g["name"], 1.0))


def optimized_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]
