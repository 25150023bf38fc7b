"""A learnable global temperature tau, shared by FastCLIP (v0, v3), NeuCLIP and AmorLIP (docs/method.md §3).

Two parameterisations, as the public code bases have them:
- "tau" (the FastCLIP code base, and NeuCLIP built on it): tau itself is the parameter;
- "log_scale" (open_clip's `logit_scale = log(1/tau)`, which the public AmorLIP code learns).
Either way the parameter has its own AdamW group without weight decay at `lr_tau`; once tau <= tau_lr_threshold
(0.03) that lr is divided by 3 for the rest of the run (the FastCLIP group's `step_thresh` schedule; a sticky
flag kept in the state, so a resume keeps it). After each step tau is projected onto [tau_min, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from neuclip.estimators.options import number

TEMPERATURE_OPTIONS = {
    "tau_init": number(0.07, "initial global temperature", exclusive_minimum=0, maximum=1, shared=True),
    "tau_min": number(0.01, "lower bound of tau (projection after each step)", exclusive_minimum=0, maximum=1),
    "lr_tau": number(2e-4, "lr of the temperature's own AdamW group (no weight decay)", minimum=0, shared=True),
    "tau_lr_threshold": number(0.03, "divide lr_tau by 3 for good once tau <= this (0 = never)", minimum=0),
}


class LearnableTemperature:
    """Mixin for an Estimator with cfg keys tau_init, tau_min, lr_tau, tau_lr_threshold."""

    def init_temperature(self, learn: bool = True, parameterisation: str = "tau") -> None:
        self.learn_tau = learn
        self.tau_parameterisation = parameterisation
        tau0 = float(self.cfg["tau_init"])
        if parameterisation == "log_scale":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau0)), requires_grad=learn)
        else:
            self.tau = nn.Parameter(torch.tensor(tau0), requires_grad=learn)
        self.register_buffer("tau_lr_reduced", torch.tensor(False))

    def live_tau(self) -> torch.Tensor:
        """tau as a tensor in the autograd graph (its gradient reaches the parameter)."""
        if self.tau_parameterisation == "log_scale":
            return torch.exp(-self.logit_scale)
        return self.tau

    def _tau_parameter(self) -> nn.Parameter:
        return self.logit_scale if self.tau_parameterisation == "log_scale" else self.tau

    def param_groups(self) -> list[dict]:
        if not self.learn_tau:
            return []
        return [{"name": "tau", "params": [self._tau_parameter()], "weight_decay": 0.0, "lr": self.cfg["lr_tau"]}]

    def lr_factors(self) -> dict[str, float]:
        return {"tau": 1.0 / 3.0} if bool(self.tau_lr_reduced) else {}

    @torch.no_grad()
    def project_temperature(self) -> None:
        if self.tau_parameterisation == "log_scale":
            self.logit_scale.clamp_(0.0, math.log(1.0 / self.cfg["tau_min"]))
        else:
            self.tau.clamp_(self.cfg["tau_min"], 1.0)
        if self.temperature() <= self.cfg["tau_lr_threshold"]:
            self.tau_lr_reduced.fill_(True)

    def temperature(self) -> float:
        return float(self.live_tau().detach())
