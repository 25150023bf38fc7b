"""A learnable global temperature tau, shared by FastCLIP (v0, v3), NeuCLIP and AmorLIP (docs/method.md §3).

Two parameterisations, as the public code bases have them:
- "tau" (the FastCLIP code base, and NeuCLIP built on it): tau itself is the parameter;
- "log_scale" (open_clip's `logit_scale = log(1/tau)`, which the public AmorLIP code learns).
Either way the parameter has its own AdamW group without weight decay at `lr_tau`, and after each step tau is
projected onto [tau_min, 1]. The group's learning rate follows `tau_schedule`:
- "step_thresh" (default): the FastCLIP group's `step_lr_thresh`, as fast_clip's and AmorLIP's training scripts
  call it (warmup 0, thresholds [tau_lr_threshold], ratios [1/3]): lr_tau constant, with no warmup and no decay,
  divided by 3 *while* tau <= tau_lr_threshold, checked at every step on tau as the step begins. The lr is a
  function of tau alone, so a resume (which restores tau) continues it exactly.
- "model_cosine": this project's schedule before 2026-12-06, kept to reproduce runs made with it: the model's
  warmup and cosine applied to lr_tau, and the division by 3 kept for good once tau first reaches the
  threshold (a flag in the estimator's state).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from neuclip.estimators.options import choice, number

TAU_SCHEDULES = ("step_thresh", "model_cosine")

TEMPERATURE_OPTIONS = {
    "tau_init": number(0.07, "initial global temperature", exclusive_minimum=0, maximum=1, shared=True),
    "tau_min": number(0.01, "lower bound of tau (projection after each step)", exclusive_minimum=0, maximum=1),
    "lr_tau": number(2e-4, "lr of the temperature's own AdamW group (no weight decay)", minimum=0, shared=True),
    "tau_lr_threshold": number(0.03, "lr_tau is divided by 3 while tau <= this (0 = never)", minimum=0),
    "tau_schedule": choice("step_thresh", TAU_SCHEDULES,
                           "step_thresh: constant lr_tau, / 3 while tau <= tau_lr_threshold (public fast_clip); "
                           "model_cosine: the model's warmup and cosine, / 3 for good once below (before 2026-12-06)",
                           shared=True),
}


# The RGCL-g objective's knobs, shared by every method with a learned global tau on it (FastCLIP-v3, NeuCLIP):
# declared here, with the estimator interface, so no method imports another's file for them.
RHO = number(6.5, "rho of RGCL(-g): the temperature's penalty weight", minimum=0, shared=True)
TAU_GRAD = choice("public", ("public", "exact"),
                  "form of the global tau gradient (docs/method.md §3; docs/methods.md for the default)",
                  shared=True)


class LearnableTemperature:
    """Mixin for an Estimator with cfg keys tau_init, tau_min, lr_tau, tau_lr_threshold, tau_schedule."""

    def init_temperature(self, learn: bool = True, parameterisation: str = "tau") -> None:
        self.learn_tau = learn
        self.tau_parameterisation = parameterisation
        tau0 = float(self.cfg["tau_init"])
        if parameterisation == "log_scale":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau0)), requires_grad=learn)
        else:
            self.tau = nn.Parameter(torch.tensor(tau0), requires_grad=learn)
        # model_cosine's sticky flag (unused, but kept in every state dict so checkpoints load either way)
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
        # step_thresh: the trainer's warmup and cosine do not apply to this group (optim.set_lr)
        follows = self.cfg["tau_schedule"] == "model_cosine"
        return [{"name": "tau", "params": [self._tau_parameter()], "weight_decay": 0.0, "lr": self.cfg["lr_tau"],
                 "follows_model_schedule": follows}]

    def lr_factors(self) -> dict[str, float]:
        threshold = float(self.cfg["tau_lr_threshold"])
        if self.cfg["tau_schedule"] == "model_cosine":
            below = bool(self.tau_lr_reduced)
        else:
            below = threshold > 0 and self.temperature() <= threshold
        return {"tau": 1.0 / 3.0} if below else {}

    @torch.no_grad()
    def project_temperature(self) -> None:
        if self.tau_parameterisation == "log_scale":
            self.logit_scale.clamp_(0.0, math.log(1.0 / self.cfg["tau_min"]))
        else:
            self.tau.clamp_(self.cfg["tau_min"], 1.0)
        if self.cfg["tau_schedule"] == "model_cosine" and self.temperature() <= self.cfg["tau_lr_threshold"]:
            self.tau_lr_reduced.fill_(True)

    def temperature(self) -> float:
        return float(self.live_tau().detach())
