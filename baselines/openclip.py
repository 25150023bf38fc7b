"""OpenCLIP: the mini-batch contrastive loss (MBCL), via open_clip's own `ClipLoss`.

    L = 1/(2B) sum_i [ -log softmax_j(s_ij / tau)_i - log softmax_j(s_ji / tau)_i ]

The normaliser is implicitly the batch sum, biased for small B. The temperature is open_clip's
`logit_scale = log(1/tau)`, learnable, clamped to 1/tau <= 100 after each step as open_clip's trainer does, and
trained at the model's lr without weight decay (`lr_logit_scale: null`) as both open_clip_train and the FastCLIP
code base's OpenCLIP baseline do (its scripts pass no --lr_tau, so lr_tau = lr; docs/methods.md).
Distributed: `local_loss=True, gather_with_grad=True`, so each rank's loss is the mean over its anchors and
DDP's gradient average is the whole-batch gradient. Error-study estimate: log(eps + g_hat) from a random batch.
"""

from __future__ import annotations

import math

import torch
from open_clip.loss import ClipLoss
from torch import nn

from neuclip.estimators.base import Batch, Estimator, EstimatorContext, StepOutput
from neuclip.estimators.ops import world
from neuclip.estimators.options import boolean, number


class OpenCLIP(Estimator):
    name = "openclip"
    label = "OpenCLIP"
    description = "mini-batch contrastive loss (open_clip ClipLoss), learnable tau"
    estimate_kind = "minibatch"
    colour = "tab:blue"
    shadow: dict | None = {}
    order = 10
    options = {
        "tau_init": number(0.07, "initial temperature (logit_scale = log(1/tau))", exclusive_minimum=0, maximum=1,
                           shared=True),
        "max_logit_scale": number(100.0, "clamp of 1/tau after each step", minimum=1),
        "learn_tau": boolean(True, "learn the temperature"),
        "lr_logit_scale": number(None, "lr of logit_scale; null = the model lr", minimum=0, nullable=True),
    }

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        super().__init__(cfg, ctx)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg["tau_init"])), requires_grad=cfg["learn_tau"])

    def forward(self, batch: Batch) -> StepOutput:
        rank, size = world()
        loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=size)
        dtype = torch.promote_types(batch.image.dtype, torch.float32)
        scale = self.logit_scale.exp().to(dtype)
        loss = loss_fn(batch.image.to(dtype), batch.text.to(dtype), scale)
        return StepOutput(loss, {"tau": self.temperature()})

    def param_groups(self) -> list[dict]:
        if not self.cfg["learn_tau"]:
            return []
        return [{"name": "tau", "params": [self.logit_scale], "weight_decay": 0.0, "lr": self.cfg["lr_logit_scale"]}]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.cfg["max_logit_scale"]))

    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().exp())
