"""SogCLR: the GCL objective with per-sample moving-average normalisers and a constant gamma (docs/method.md §3).

    objective: 1/n sum_i [log(eps + g1_i) + log(eps + g2_i)],  tau fixed
    u_k[i] <- (1 - gamma) u_k[i] + gamma (eps + g_hat_k[i]),    gradient sum_j exp(h_ij) grad h_ij / ((B-1) u_i)

It is FastCLIP-v1's objective with SogCLR's constant gamma (0.9 in its paper); see fastclip.GlobalContrastive.
"""

from __future__ import annotations

from baselines.fastclip import GlobalContrastive
from baselines.per_sample import PerSampleEstimator
from neuclip.estimators.base import EstimatorContext
from neuclip.estimators.options import number


class SogCLR(GlobalContrastive):
    name = "sogclr"
    label = "SogCLR"
    description = "GCL with per-sample moving-average normalisers, constant gamma"
    colour = "tab:orange"
    shadow: dict | None = {"gamma": 0.9}
    order = 30
    options = {
        **PerSampleEstimator.common_options,
        "tau_init": number(0.07, "the fixed temperature", exclusive_minimum=0, maximum=1, shared=True),
    }

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        # tau is fixed: never stepped, so the temperature's schedule keys are placeholders
        cfg = {**cfg, "tau_min": 0.01, "tau_lr_threshold": 0.0, "lr_tau": None, "tau_schedule": "step_thresh"}
        super().__init__(cfg, ctx, objective="gcl", learn_tau=False)
