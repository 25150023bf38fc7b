"""AmorLIP: amortised normalisers, lambda-MLPs regressed onto absolute-scale mini-batch sums (docs/method.md §5).

Follows the public AmorLIP code (haotiansun14/AmorLIP) and its README recipe. With logits z_ij = s_ij / tau and
the positive term's weight c (`pos_coef`), per anchor and modality:

    batch sum       log Z_k_i = log( sum_{j != i} exp(z_kij) + c exp(z_kii) )      (detached, global batch)
    lambda target   log T_k_i = log( beta_E exp(log lambda_prev_k(i)) + (1 - beta_E) Z_k_i )   (fit_w_prev)
                              = log Z_k_i                                                       (ema)
    lambda loss     MSE(log lambda_k(i), log T_k_i), `inner_steps` Adam steps per batch on the online nets,
                    each with the nets' gradient norm clipped to `lambda_grad_clip` (the README's
                    --grad-clip-norm 1.0, which the public code applies to the lambda-nets too)
    encoder weight  fit_w_prev: T_k_i itself;  ema: the EMA net's lambda_k(i), queried before this step's EMA
                    update as the public code does (`ema_query: after_update` is the former order)
    encoder loss    tau_det * [ -2 mean_i z_ii + sum_k mean_i sum_j exp(z_kij + [j = i] log c) / w_k_i ] + rho tau
                    (+ tau * (mean_i(log w_1i + log w_2i) - 2 log B - 2 mean_i z_ii), detached, with adaptive_tau)

The nets see only the anchor, never its pair, so they regress the absolute-scale sum, which does not depend on
s_ii (regressing §1's alpha, which contains s_ii/tau, cannot be learned: docs/method.md §5). §1's scale is
recovered only where alpha is used (the error study): alpha_i = log lambda_i - z_ii - log(B - 1).

Schedules, per epoch E as in the public code: beta_E rises by a half cosine from 0 (epoch 0) to beta_max over
`beta_decay_epochs`; at each epoch start the EMA net is frozen as lambda_prev, then the online nets are
re-initialised (every `reinit_every_epochs`) with a fresh Adam and the EMA copied from them; the EMA follows
the online nets at every `ema_every`-th step of the epoch (counted from 0 at the epoch start, as the public
code counts) with decay `ema_decay` (fit_w_prev) or with the beta_E schedule (ema mode, the public code without
--fit_w_prev). rho may follow `rho_list` (equal segments of the run, as the
public --rho_list). The temperature is open_clip's logit_scale = log(1/tau), learned at lr_tau as the public
code does. Lambda-nets are residual MLPs in float32 (hidden factor `mlp_factor`: 0.5 on CC3M, 1.0 on CC12M),
updated on the whole gathered batch on every rank (replicated, identical).

Choices (docs/methods.md): a fixed number of lambda steps (the public code may stop early on a tolerance);
each re-initialised net's output bias starts at its first batch's mean target, so that a net that has seen
few batches is not off by log B; B in the adaptive-tau term is the global batch (the public code uses the
per-GPU batch, equal on one GPU); the lambda-nets' Adam keeps `lambda_lr` after a re-initialisation (the public
code multiplies it by the world size there).
"""

from __future__ import annotations

import copy
import math

import torch

from neuclip.estimators.base import Batch, Estimator, EstimatorContext, StepOutput
from neuclip.estimators.inner import InnerOptimizer
from neuclip.estimators.ops import GlobalView, gradient_neutral
from neuclip.estimators.options import Option, boolean, choice, integer, number
from neuclip.estimators.temperature import TEMPERATURE_OPTIONS, LearnableTemperature
from neuclip.nets import MLPNPN


def cosine_rise(epoch: int, decay_epochs: float, beta_max: float) -> float:
    """The public code's get_cosine_ema_beta: 0 at epoch 0, beta_max from `decay_epochs` on."""
    if epoch >= decay_epochs:
        return beta_max
    return beta_max - beta_max * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))


def segment_value(values: list[float], epoch: int, total_epochs: int) -> float:
    """The public create_epoch_schedule: len(values) equal segments of the run, the last takes the rest."""
    part = max(1, total_epochs // len(values))
    return float(values[min(epoch // part, len(values) - 1)])


def log_batch_sums(logits: torch.Tensor, offset: int, log_pos_coef: float | None) -> torch.Tensor:
    """log(sum_{j != i} exp(z_ij) + c exp(z_ii)) for rows i = offset.. of `logits` (rows: anchors, cols: all)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    diag = logits[rows, rows + offset]
    masked = logits.clone()
    masked[rows, rows + offset] = -math.inf
    neg = torch.logsumexp(masked, dim=1)
    return neg if log_pos_coef is None else torch.logaddexp(neg, diag + log_pos_coef)


class AmorLIP(LearnableTemperature, InnerOptimizer, Estimator):
    name = "amorlip"
    label = "AmorLIP"
    description = "amortised normalisers: lambda-MLPs regressed on absolute-scale batch sums (fit_w_prev recipe)"
    colour = "tab:purple"
    shadow: dict | None = {}
    order = 60
    options: dict[str, Option] = {
        **TEMPERATURE_OPTIONS,
        "lr_tau": number(1e-4, "lr of logit_scale = log(1/tau) (AmorLIP README: 1e-4)", minimum=0, shared=True),
        "rho": number(6.5, "rho: the temperature's penalty weight", shared=True),
        "rho_list": Option(None, {"anyOf": [{"type": "array", "items": {"type": "number"}, "minItems": 1},
                                            {"type": "null"}]},
                           "rho per equal segment of the run (public --rho_list, e.g. [8.5, -8.5, -8.5]); null = rho"),
        "mode": choice("fit_w_prev", ("fit_w_prev", "ema"), "fit_w_prev: README recipe; ema: EMA-net weights"),
        "adaptive_tau": boolean(False, "add the public --adaptive_tau term to the tau gradient"),
        "pos_coef": number(1e-3, "weight c of the positive pair in the batch sum (public --pos_coef)", minimum=0),
        "mlp_factor": number(0.5, "hidden width factor of the lambda-nets (0.5 CC3M, 1.0 CC12M)", exclusive_minimum=0),
        "inner_steps": integer(3, "Adam steps of the lambda-nets per batch", minimum=1),
        "lambda_lr": number(1e-3, "Adam lr of the lambda-nets", exclusive_minimum=0),
        "ema_decay": number(0.92, "fit_w_prev: EMA decay of the lambda-nets (public --model_ema_beta)",
                            minimum=0, maximum=1),
        "ema_every": integer(2, "EMA update at every n-th step of an epoch (public --update_ema_mlps_every_n_steps)",
                             minimum=1),
        "ema_query": choice("before_update", ("before_update", "after_update"),
                            "ema mode: the encoder's weight from the EMA nets before this step's EMA update (public) "
                            "or after it (before 2026-12-06)"),
        "lambda_grad_clip": number(1.0, "clip of the lambda-nets' gradient norm per inner step (README "
                                   "--grad-clip-norm 1.0); null = none", exclusive_minimum=0, nullable=True),
        "beta_max": number(0.8, "final beta of the target mixing (fit_w_prev) or EMA decay (ema)", minimum=0,
                           maximum=1),
        "beta_decay_epochs": number(None, "epochs for beta to reach beta_max; null = half the run",
                                    exclusive_minimum=0, nullable=True),
        "reinit_every_epochs": integer(1, "re-initialise the online lambda-nets every N epochs (0 = never)",
                                       minimum=0),
        "seed": integer(0, "seed of the lambda-nets' initialisation", minimum=0, shared=True),
    }

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        super().__init__(cfg, ctx)
        self.init_temperature(parameterisation="log_scale")
        self.online = self._new_nets(0)
        self.target = copy.deepcopy(self.online).requires_grad_(False)  # the EMA nets
        self.prev = copy.deepcopy(self.online).requires_grad_(False)  # frozen EMA snapshot of the epoch start
        self.register_buffer("iteration", torch.tensor(0))
        self.register_buffer("epoch", torch.tensor(0))
        self.register_buffer("epoch_step", torch.tensor(0))  # steps since the epoch began (the EMA cadence)
        self.register_buffer("needs_bias_init", torch.tensor(True))
        self.register_buffer("train_batch", torch.tensor(0))  # global batch B, for alpha's log(B - 1)

    def _new_nets(self, epoch: int) -> MLPNPN:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.cfg["seed"]) * 100_003 + epoch)
            return MLPNPN(self.ctx.embed_dim, self.cfg["mlp_factor"])

    def make_inner_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.online.parameters(), lr=self.cfg["lambda_lr"])

    # -- schedules ---------------------------------------------------------------------------------------
    def beta(self, epoch: int) -> float:
        decay = self.cfg["beta_decay_epochs"] or max(self.ctx.total_epochs / 2.0, 1e-9)
        return cosine_rise(epoch, decay, self.cfg["beta_max"])

    def rho(self, epoch: int) -> float:
        values = self.cfg["rho_list"]
        if not values:
            return float(self.cfg["rho"])
        return segment_value(values, epoch, max(1, math.ceil(self.ctx.total_epochs)))

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch.fill_(epoch)
        self.epoch_step.fill_(0)
        device = next(self.online.parameters()).device
        self.prev.load_state_dict(self.target.state_dict())
        every = int(self.cfg["reinit_every_epochs"])
        if every > 0 and epoch % every == 0:
            self.online.load_state_dict(self._new_nets(epoch).to(device).state_dict())
            self.target.load_state_dict(self.online.state_dict())
            self.reset_inner_optimizer()
            self.needs_bias_init.fill_(True)

    # -- the two blocks ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _targets(self, all_image, all_text, scale: float, beta: float, log_c):
        dtype = torch.promote_types(all_image.dtype, torch.float32)
        sim = all_image.to(dtype) @ all_text.to(dtype).T
        log_z1 = log_batch_sums(sim * scale, 0, log_c)
        log_z2 = log_batch_sums(sim.T * scale, 0, log_c)
        if self.cfg["mode"] == "fit_w_prev" and beta > 0:
            prev1, prev2 = self.prev(all_image, all_text, None, None, 0.0)
            log_z1 = torch.logaddexp(prev1 + math.log(beta), log_z1 + math.log1p(-beta))
            log_z2 = torch.logaddexp(prev2 + math.log(beta), log_z2 + math.log1p(-beta))
        return log_z1, log_z2

    def _fit_lambda(self, all_image, all_text, targets) -> None:
        if bool(self.needs_bias_init):
            with torch.no_grad():  # (choice) start the fresh nets at the mean target
                for net in (self.online, self.target):
                    net.net1.head.bias.fill_(float(targets[0].mean()))
                    net.net2.head.bias.fill_(float(targets[1].mean()))
            self.needs_bias_init.fill_(False)
        opt = self.inner_optimizer()
        with torch.enable_grad():  # the inner block trains even when the caller runs under no_grad (shadows)
            for _ in range(int(self.cfg["inner_steps"])):
                opt.zero_grad(set_to_none=True)
                pred1, pred2 = self.online(all_image, all_text, None, None, 0.0)
                (((pred1 - targets[0]) ** 2).mean() + ((pred2 - targets[1]) ** 2).mean()).backward()
                if self.cfg["lambda_grad_clip"] is not None:
                    torch.nn.utils.clip_grad_norm_(self.online.parameters(), float(self.cfg["lambda_grad_clip"]))
                opt.step()

    @torch.no_grad()
    def _update_ema(self, epoch: int) -> None:
        if int(self.epoch_step) % int(self.cfg["ema_every"]) != 0:
            return
        decay = self.cfg["ema_decay"] if self.cfg["mode"] == "fit_w_prev" else self.beta(epoch)
        for p_t, p_o in zip(self.target.parameters(), self.online.parameters()):
            p_t.mul_(decay).add_(p_o, alpha=1.0 - decay)

    def forward(self, batch: Batch) -> StepOutput:
        view = GlobalView(batch.image, batch.text, batch.ids)
        epoch = int(self.epoch)
        tau = self.live_tau()
        scale_now = 1.0 / float(tau.detach())
        c = float(self.cfg["pos_coef"])
        log_c = math.log(c) if c > 0 else None
        all_image, all_text = view.all_image.detach(), view.all_text.detach()
        self.train_batch.fill_(view.size)

        beta = self.beta(epoch)
        targets = self._targets(all_image, all_text, scale_now, beta, log_c)
        self._fit_lambda(all_image, all_text, targets)
        query_first = self.cfg["ema_query"] == "before_update"
        if not query_first:
            self._update_ema(epoch)

        local = slice(view.offset, view.offset + batch.image.shape[0])
        with torch.no_grad():
            if self.cfg["mode"] == "fit_w_prev":
                log_w1, log_w2 = targets[0][local], targets[1][local]
            else:
                log_w1, log_w2 = self.target(all_image[local], all_text[local], None, None, 0.0)
        if query_first:
            self._update_ema(epoch)
        self.iteration += 1
        self.epoch_step += 1
        loss, value, stats = self._encoder_loss(view, tau, log_w1, log_w2, log_c, epoch)
        stats.update({"beta": beta, "log_lambda1_mean": float(log_w1.mean()), "log_lambda2_mean": float(log_w2.mean())})
        return StepOutput(gradient_neutral(loss, value), stats)

    def _encoder_loss(self, view: GlobalView, tau, log_w1, log_w2, log_c, epoch: int):
        dtype = torch.promote_types(view.image.dtype, torch.float32)
        image, text = view.image.to(dtype), view.text.to(dtype)
        z1 = image @ view.all_text.to(dtype).T / tau  # (b, B): local images against all texts
        z2 = text @ view.all_image.to(dtype).T / tau
        rows = torch.arange(z1.shape[0], device=z1.device)
        pos = z1[rows, rows + view.offset]  # z_ii (equal in both directions)
        if log_c is not None:
            shift = view.mask.to(dtype) * log_c  # log c on the positive pair, in the compute dtype
            z1, z2 = z1 + shift, z2 + shift
        else:
            z1, z2 = z1.masked_fill(view.mask, -math.inf), z2.masked_fill(view.mask, -math.inf)
        ratio1 = torch.exp(torch.logsumexp(z1, dim=1) - log_w1.to(dtype))
        ratio2 = torch.exp(torch.logsumexp(z2, dim=1) - log_w2.to(dtype))
        tau_det, rho = tau.detach(), self.rho(epoch)
        bound = (-2.0 * pos + ratio1 + ratio2).mean()
        loss = tau_det * bound + rho * tau
        if self.cfg["adaptive_tau"]:
            with torch.no_grad():
                coef = (log_w1 + log_w2).mean() - 2.0 * math.log(view.size) - 2.0 * pos.mean()
            loss = loss + coef * tau
        with torch.no_grad():  # the method's own estimate of its objective: log-sum form, at the bound
            value = tau_det * (ratio1 + log_w1 - 1 + ratio2 + log_w2 - 1 - 2 * pos).mean() + rho * tau_det
        stats = {"tau": float(tau_det), "rho": rho}
        return loss, value, stats

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.project_temperature()

    @torch.no_grad()
    def log_normalizers(self, image, text, ids):
        """alpha on §1's scale from the EMA nets' absolute-scale prediction: log lambda - z_ii - log(B - 1)."""
        b = int(self.train_batch)
        if b < 2:
            raise RuntimeError("amorlip: log_normalizers before any training step (the batch size B is unknown)")
        dtype = torch.promote_types(image.dtype, torch.float32)
        pos = (image.to(dtype) * text.to(dtype)).sum(1) / self.temperature()
        lam1, lam2 = self.target(image, text, None, None, 0.0)
        shift = math.log(b - 1)
        return (lam1 - pos - shift).float(), (lam2 - pos - shift).float()
