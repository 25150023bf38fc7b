"""A learnable global temperature tau, shared by FastCLIP (v0, v3), NeuCLIP and AmorLIP.

tau itself is the parameter (as in the FastCLIP code base), in its own AdamW group without weight decay at
lr_tau; once tau <= tau_lr_threshold (0.03) that lr is divided by 3 for the rest of the run (a sticky flag kept
in the state, so a resume keeps it). After each step tau is projected onto [tau_min, 1].
"""

from __future__ import annotations

import torch
from torch import nn

TEMPERATURE_DEFAULTS = {"tau_init": 0.07, "tau_min": 0.01, "lr_tau": 2e-4, "tau_lr_threshold": 0.03}


class LearnableTemperature:
    """Mixin for an Estimator with cfg keys tau_init, tau_min, lr_tau, tau_lr_threshold."""

    def init_temperature(self, learn: bool = True) -> None:
        self.learn_tau = learn
        self.tau = nn.Parameter(torch.tensor(float(self.cfg["tau_init"])), requires_grad=learn)
        self.register_buffer("tau_lr_reduced", torch.tensor(False))

    def param_groups(self) -> list[dict]:
        if not self.learn_tau:
            return []
        return [{"name": "tau", "params": [self.tau], "weight_decay": 0.0, "lr": self.cfg["lr_tau"]}]

    def lr_factors(self) -> dict[str, float]:
        return {"tau": 1.0 / 3.0} if bool(self.tau_lr_reduced) else {}

    @torch.no_grad()
    def project_temperature(self) -> None:
        self.tau.clamp_(self.cfg["tau_min"], 1.0)
        if float(self.tau) <= self.cfg["tau_lr_threshold"]:
            self.tau_lr_reduced.fill_(True)

    def temperature(self) -> float:
        return float(self.tau.detach())
