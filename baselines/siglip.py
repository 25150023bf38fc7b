"""SigLIP: the pairwise sigmoid loss, via open_clip's own `SigLipLoss`.

    L = -1/B sum_i sum_j log sigmoid( z_ij * (s_ij / tau + b) ),  z_ij = +1 if i == j else -1

Learnable logit scale (init log 10, i.e. tau = 0.1) and bias (init -10), both at the model lr without weight
decay (`lr_logit_scale: null`), as open_clip_train trains them. There is no normaliser, so SigLIP is
left out of the error study. Distributed: open_clip's neighbour exchange (`dist_impl`), each rank's loss summed
over its images against all texts and divided by the local batch, so DDP's average is the whole-batch loss.
"""

from __future__ import annotations

import math

import torch
from open_clip.loss import SigLipLoss
from torch import nn

from neuclip.estimators.base import Batch, Estimator, EstimatorContext, StepOutput
from neuclip.estimators.ops import world
from neuclip.estimators.options import choice, number


class SigLIP(Estimator):
    name = "siglip"
    label = "SigLIP"
    description = "pairwise sigmoid loss (open_clip SigLipLoss), no normaliser"
    estimate_kind = "none"
    colour = "tab:gray"
    order = 20
    options = {
        "logit_scale_init": number(math.log(10.0), "initial log(1/tau)"),
        "logit_bias_init": number(-10.0, "initial logit bias"),
        "dist_impl": choice("gather", ("bidir", "shift", "reduce", "gather"), "open_clip SigLipLoss dist_impl"),
        "lr_logit_scale": number(None, "lr of logit scale and bias; null = the model lr", minimum=0, nullable=True),
    }

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        super().__init__(cfg, ctx)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg["logit_scale_init"])))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg["logit_bias_init"])))

    def forward(self, batch: Batch) -> StepOutput:
        rank, size = world()
        loss_fn = SigLipLoss(rank=rank, world_size=size, dist_impl=self.cfg["dist_impl"])
        dtype = torch.promote_types(batch.image.dtype, torch.float32)
        loss = loss_fn(
            batch.image.to(dtype), batch.text.to(dtype), self.logit_scale.exp().to(dtype), self.logit_bias.to(dtype)
        )
        return StepOutput(loss, {"tau": self.temperature(), "logit_bias": float(self.logit_bias.detach())})

    def param_groups(self) -> list[dict]:
        return [
            {
                "name": "tau",
                "params": [self.logit_scale, self.logit_bias],
                "weight_decay": 0.0,
                "lr": self.cfg["lr_logit_scale"],
            }
        ]

    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().exp())
