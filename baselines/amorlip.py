"""AmorLIP: amortised normalisers from a lambda-MLP regressed onto EMA-mixed mini-batch targets (METHOD §5).

Implemented on the normalisation of METHOD §1, so that log lambda is directly comparable with
alpha* = log(eps + g) in the error study (the choice METHOD §5 asks for):

    target      log Z_k_i = log( beta_t exp(log lambda_EMA_k(i)) + (1 - beta_t) (eps + g_hat_k_i) )
    lambda loss MSE(log lambda_k(i), stop-grad(log Z_k_i)), `inner_steps` Adam steps per batch (lr 1e-3)
    encoder     tau/|B| sum_i sum_k [ exp(l_k_i - log lambda_EMA_k(i)) + log lambda_EMA_k(i) - 1 ] + rho tau

with l = log(eps + g_hat). The encoder term is AmorLIP's "-2 mean(positive logit) + mean sum_j exp(logit_ij) /
lambda_i, scaled by 1/logit_scale, plus rho/logit_scale" once the positive logit is folded into h_ij; the
constant "+ log lambda - 1" (no gradient) makes its value the unified bound, comparable across methods.
beta_t rises by a half cosine from 0 to beta_max over `beta_warmup_steps` (default: the whole run); the EMA
target network follows the online one with decay `ema_decay` and is re-initialised from it at every epoch.
Lambda-nets are residual MLPs (hidden factor `mlp_factor`: 0.5 on CC3M, 1.0 on CC12M), in float32, updated on
the whole gathered batch on every rank (replicated, identical). Their output bias starts at the first batch's
mean log-normaliser (a choice: from zero, exp(l - log lambda) ~ e^14 at tau = 0.07 and training explodes).
"""

from __future__ import annotations

import copy
import math

import torch

from neuclip.estimators.base import Batch, Estimator, EstimatorContext, StepOutput
from neuclip.estimators.inner import InnerOptimizer
from neuclip.estimators.ops import GlobalView, gather_no_grad, log_eps_g
from neuclip.estimators.temperature import TEMPERATURE_DEFAULTS, LearnableTemperature
from neuclip.nets import MLPNPN


class AmorLIP(LearnableTemperature, InnerOptimizer, Estimator):
    name = "amorlip"
    description = "amortised normalisers: lambda-MLP regressed on EMA targets"
    defaults = {
        **TEMPERATURE_DEFAULTS,
        "eps": 1e-14,
        "rho": 6.5,
        "mlp_factor": 0.5,
        "inner_steps": 3,
        "lambda_lr": 1e-3,
        "ema_decay": 0.999,
        "beta_max": 0.8,
        "beta_warmup_steps": None,  # None = total steps of the run
        "seed": 0,
    }

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        super().__init__(cfg, ctx)
        self.init_temperature()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            self.online = MLPNPN(ctx.embed_dim, cfg["mlp_factor"])
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.register_buffer("iteration", torch.tensor(0))

    def make_inner_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.online.parameters(), lr=self.cfg["lambda_lr"])

    def beta(self, step: int) -> float:
        span = self.cfg["beta_warmup_steps"] or self.ctx.total_steps
        frac = min(1.0, step / max(1, span))
        return self.cfg["beta_max"] * 0.5 * (1.0 - math.cos(math.pi * frac))

    def on_epoch_start(self, epoch: int) -> None:
        self.target.load_state_dict(self.online.state_dict())

    def forward(self, batch: Batch) -> StepOutput:
        view = GlobalView(batch.image, batch.text, batch.ids)
        d1, d2 = view.diffs()
        tau = self.tau.to(d1.dtype)
        eps = self.cfg["eps"]
        log_g1, log_g2 = log_eps_g(d1 / tau, view.mask, eps), log_eps_g(d2 / tau, view.mask, eps)
        all_image, all_text = view.all_image.detach(), view.all_text.detach()

        # lambda block: regress the online nets onto EMA-mixed targets, on the whole global batch.
        beta = self.beta(int(self.iteration))
        with torch.no_grad():
            prev1, prev2 = self.target(all_image, all_text, None, None, eps)
            targets = []
            for prev, log_g in ((prev1, log_g1), (prev2, log_g2)):
                batch_target = gather_no_grad(log_g.detach()).to(prev.dtype)
                if beta > 0:
                    batch_target = torch.logaddexp(prev + math.log(beta), batch_target + math.log1p(-beta))
                targets.append(batch_target)
            if int(self.iteration) == 0:
                # (choice) data-dependent init: start both nets at the first batch's mean log-normaliser, else
                # exp(l - log lambda) ~ e^14 at tau = 0.07 and the first encoder steps explode.
                for net in (self.online, self.target):
                    net.net1.head.bias.fill_(float(targets[0].mean()))
                    net.net2.head.bias.fill_(float(targets[1].mean()))
        opt = self.inner_optimizer()
        with torch.enable_grad():  # the inner block trains even when the caller runs under no_grad (shadows)
            for _ in range(int(self.cfg["inner_steps"])):
                opt.zero_grad(set_to_none=True)
                pred1, pred2 = self.online(all_image, all_text, None, None, eps)
                (((pred1 - targets[0]) ** 2).mean() + ((pred2 - targets[1]) ** 2).mean()).backward()
                opt.step()
        with torch.no_grad():
            decay = self.cfg["ema_decay"]
            for p_t, p_o in zip(self.target.parameters(), self.online.parameters()):
                p_t.mul_(decay).add_(p_o, alpha=1.0 - decay)
        self.iteration += 1

        # encoder block: the EMA network's lambda is the fixed normaliser.
        local = slice(view.offset, view.offset + batch.image.shape[0])
        with torch.no_grad():
            lam1, lam2 = self.target(all_image[local], all_text[local], None, None, eps)
        terms = torch.exp(log_g1 - lam1) + lam1 - 1 + torch.exp(log_g2 - lam2) + lam2 - 1
        loss = tau * terms.mean() + self.cfg["rho"] * tau
        stats = {
            "tau": float(tau.detach()),
            "beta": beta,
            "alpha1_mean": float(lam1.mean()),
            "alpha2_mean": float(lam2.mean()),
        }
        return StepOutput(loss, stats)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.project_temperature()

    @torch.no_grad()
    def log_normalizers(self, image, text, ids):
        a1, a2 = self.target(image, text, None, None, self.cfg["eps"])
        return a1.float(), a2.float()
