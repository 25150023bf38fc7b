"""FastCLIP (v0, v1, v3) and the GCL / RGCL-g objectives on per-sample normaliser state (docs/method.md §2-3).

    GCL    (v0: learnable tau, v1: fixed tau):  1/n sum_i [log(eps + g1_i) + log(eps + g2_i)]
    RGCL-g (v3, default):                       tau/n sum_i [log(eps + g1_i) + log(eps + g2_i)] + 2 rho tau

The log u state follows `per_sample.PerSampleEstimator` with FastCLIP's cosine gamma schedule. Gradients are
the FCCO estimates, w_ij = exp(h_ij - a_i) / (B-1) detached:
    GCL:    grad = sum_j w_ij grad h_ij                 (h_ij = (s_ij - s_ii) / tau, live in tau)
    RGCL-g: grad_e = sum_j w_ij grad (s_ij - s_ii)
            d/dtau, with W_k = mean_i sum_j w_kij h_kij (`tau_grad`, docs/method.md §3):
              exact  = mean(a1 + a2) + 2 rho - (W1 + W2)      the gradient of RGCL-g as written
              public = mean(a1 + a2) / 2 + rho - (W1 + W2)    what the public FastCLIP code steps with, and what
                                                             the published numbers and rho values came from
tau is learned directly (own AdamW group, no weight decay, lr_tau constant and divided by 3 while tau <= 0.03:
the public step_thresh, neuclip/estimators/temperature.py), projected onto [tau_min, 1] after each step.
The logged loss is the state's own estimate of the objective.
FastCLIP-v2 (per-sample temperatures) is `isogclr` with `gamma_schedule: cosine`.
"""

from __future__ import annotations

import torch

from baselines.per_sample import PerSampleEstimator
from neuclip.estimators.base import Batch, EstimatorContext, StepOutput
from neuclip.estimators.ops import GlobalView, fcco_weights, gradient_neutral, log_eps_g
from neuclip.estimators.options import choice
from neuclip.estimators.temperature import RHO, TAU_GRAD, TEMPERATURE_OPTIONS, LearnableTemperature

VERSIONS = {"v0": ("gcl", True), "v1": ("gcl", False), "v3": ("rgclg", True)}


class GlobalContrastive(LearnableTemperature, PerSampleEstimator):
    """GCL or RGCL-g on per-sample state; `objective` and `learn_tau` come from the subclass config."""

    def __init__(self, cfg: dict, ctx: EstimatorContext, objective: str, learn_tau: bool):
        super().__init__(cfg, ctx)
        self.objective = objective
        self.init_temperature(learn_tau)

    def forward(self, batch: Batch) -> StepOutput:
        view = GlobalView(batch.image, batch.text, batch.ids)
        d1, d2 = view.diffs()
        tau = self.tau.to(d1.dtype)
        h1, h2 = d1 / tau, d2 / tau
        eps = self.cfg["eps"]
        gamma = self.gamma(batch.epoch)
        a1, a2 = self.update_state(view, log_eps_g(h1, view.mask, eps), log_eps_g(h2, view.mask, eps), gamma)
        w1, w2 = fcco_weights(h1, view.mask, a1), fcco_weights(h2, view.mask, a2)
        if self.objective == "gcl":
            surrogate = ((w1 * h1).sum(1) + (w2 * h2).sum(1)).mean()
            value = (a1 + a2).mean()
        else:
            encoder = ((w1 * d1).sum(1) + (w2 * d2).sum(1)).mean()
            rho = self.cfg["rho"]
            with torch.no_grad():
                fcco = ((w1 * h1).sum(1) + (w2 * h2).sum(1)).mean()
                if self.cfg["tau_grad"] == "public":
                    tau_coef = (a1 + a2).mean() / 2 + rho - fcco
                else:
                    tau_coef = (a1 + a2).mean() + 2 * rho - fcco
            surrogate = encoder + tau_coef * tau
            value = tau.detach() * (a1 + a2).mean() + 2 * rho * tau.detach()
        stats = {
            "tau": self.temperature(),
            "gamma": gamma,
            "alpha1_mean": float(a1.mean()),
            "alpha2_mean": float(a2.mean()),
        }
        return StepOutput(gradient_neutral(surrogate, value), stats)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.project_temperature()


class FastCLIP(GlobalContrastive):
    name = "fastclip"
    label = "FastCLIP-v3"
    description = "FastCLIP v0/v1/v3 (default v3: RGCL-g, cosine gamma)"
    colour = "tab:red"
    shadow: dict | None = {}
    order = 50
    options = {
        **PerSampleEstimator.common_options,
        "version": choice("v3", tuple(VERSIONS), "v0: GCL + learnable tau, v1: GCL + fixed tau, v3: RGCL-g "
                          "(v2 is isogclr with gamma_schedule: cosine)"),
        **TEMPERATURE_OPTIONS,
        "gamma_schedule": choice("cosine", ("constant", "cosine"), "gamma schedule of the moving average"),
        "rho": RHO,
        "tau_grad": TAU_GRAD,
    }

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        # v2 runs are isogclr with a cosine gamma (its label_for says so); listed here so the versions sit
        # together in every table.
        return ("FastCLIP-v0", "FastCLIP-v1", "FastCLIP-v2", "FastCLIP-v3")

    @classmethod
    def label_for(cls, options: dict | None) -> str:
        return f"FastCLIP-{(options or {}).get('version', 'v3')}"

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        objective, learn_tau = VERSIONS[cfg["version"]]
        super().__init__(cfg, ctx, objective, learn_tau)
