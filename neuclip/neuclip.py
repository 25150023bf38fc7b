"""NeuCLIP: normaliser prediction network + unified objective, optimised alternately (docs/method.md §4).

Unified objective (both blocks minimise it; computed in log space, e^-alpha (eps + g) = exp(log(eps+g) - alpha)):

    L(w, tau, W) = tau/|B| sum_i [ exp(l1_i - alpha1_i) + alpha1_i - 1 + exp(l2_i - alpha2_i) + alpha2_i - 1 ]
                   + 2 rho tau,            l_k_i = log(eps + g_hat_k_i),  alpha_k_i = NPN(e_k_i; W_k)

Because log x = min_a {x e^-a + a - 1}, L >= the RGCL-g mini-batch loss with equality (and equal encoder
gradient, by the envelope theorem) at alpha = l. Each iteration (alternating, the default):
  1. gather the global batch; every T_r iterations (t = 0 included) restart the prototypes W1 <- texts,
     W2 <- images sampled from `restart_sampling`, and (by default) reset AdaGrad;
  2. T_u AdaGrad steps on (W1, W2) for L with embeddings, s_ii and tau detached;
  3. alpha <- NPN(...).detach(); the returned loss is L, whose gradient updates encoders and tau (AdamW); the
     tau gradient takes the form `tau_grad` says (public: the FastCLIP code base's, default; exact: L's own).
The NPN block (`npn_block`) runs either on the whole gathered batch on every rank (replicated: identical work
everywhere, no communication) or on this rank's anchors only with the W gradients all-reduced (averaged) before
each AdaGrad step (sharded: 1/world of the compute, 2 m d floats all-reduced per inner step; the same W up to
the order of the float sums). Either way every rank ends with the same W. The encoder loss is on this rank's
anchors. `npn_matmul` may run the NPN's anchors x prototypes matmul with tf32 or bf16 inputs (float32 sums,
float32 W and AdaGrad state; docs/benchmarks.md measures the alpha error). No per-sample state: no sample ids.

Ablation switches (DFN-14M ablations in docs/method.md §4): objective unified|separate (separate: regress alpha onto l,
AmorLIP style), npn prototype|mlp, updates alternating|simultaneous (one joint backward; the NPN's AdaGrad step
then happens in after_optimizer_step, on rank-averaged gradients).

Choices where the paper is silent (documented in docs/methods.md): AdaGrad lr 0.05; AdaGrad reset at each
restart; restart rows drawn from a ring buffer of the last m gathered embeddings ("recent"), with replacement
plus a small jitter while fewer than m rows exist (otherwise duplicated prototypes would stay identical).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from neuclip.estimators.base import Batch, Estimator, EstimatorContext, StepOutput
from neuclip.estimators.inner import InnerOptimizer
from neuclip.estimators.ops import GlobalView, gather_no_grad, gradient_neutral, log_eps_g, world
from neuclip.estimators.options import boolean, choice, integer, number
from neuclip.estimators.temperature import RHO, TAU_GRAD, TEMPERATURE_OPTIONS, LearnableTemperature
from neuclip.nets import MATMULS, MLPNPN, PrototypeNPN

CHOICES = {
    "objective": ("unified", "separate"),
    "npn": ("prototype", "mlp"),
    "updates": ("alternating", "simultaneous"),
    "restart_sampling": ("recent", "batch"),
    "npn_block": ("replicated", "sharded"),
    "npn_matmul": MATMULS,
}


def unified_terms(log_g: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per-anchor e^-alpha (eps + g) + alpha - 1, from l = log(eps + g)."""
    return torch.exp(log_g - alpha) + alpha - 1.0


class NeuCLIP(LearnableTemperature, InnerOptimizer, Estimator):
    name = "neuclip"
    label = "NeuCLIP"
    description = "NeuCLIP: prototype normaliser-prediction network, unified objective"
    colour = "tab:green"
    shadow: dict | None = {"num_prototypes": 256}
    order = 70
    options = {
        **TEMPERATURE_OPTIONS,
        "eps": number(1e-14, "epsilon inside log(eps + g)", exclusive_minimum=0, shared=True),
        "rho": RHO,
        "tau_grad": TAU_GRAD,
        "num_prototypes": integer(4096, "m, prototypes per modality", minimum=1),
        "inner_steps": integer(10, "T_u, AdaGrad steps of the NPN per iteration (alternating updates)", minimum=1),
        "restart_every": integer(500, "T_r, iterations between prototype restarts; 0 = never after the first",
                                 minimum=0),
        "npn_lr": number(0.05, "AdaGrad lr of the NPN", exclusive_minimum=0),
        "reset_adagrad": boolean(True, "reset AdaGrad's state at each restart"),
        "restart_sampling": choice("recent", CHOICES["restart_sampling"], "where restart rows come from"),
        "restart_jitter": number(0.01, "noise added to rows drawn with replacement", minimum=0),
        "mlp_factor": number(1.0, "hidden width factor of the `npn: mlp` ablation", exclusive_minimum=0),
        "objective": choice("unified", CHOICES["objective"], "NPN objective (ablation: separate)"),
        "npn": choice("prototype", CHOICES["npn"], "NPN form (ablation: mlp)"),
        "updates": choice("alternating", CHOICES["updates"], "block updates (ablation: simultaneous)"),
        "npn_block": choice("sharded", CHOICES["npn_block"],
                            "NPN steps on each rank's local anchors with the W gradients all-reduced, or on the "
                            "whole gathered batch on every rank (docs/benchmarks.md, NPN block: the default's "
                            "numbers)"),
        "npn_matmul": choice("fp32", CHOICES["npn_matmul"],
                             "inputs of the NPN's anchors x prototypes matmul (float32 sums and state)"),
        "seed": integer(0, "seed of the NPN initialisation and restart draws", minimum=0, shared=True),
    }

    @classmethod
    def check_context(cls, options: dict, ctx: EstimatorContext, global_batch: int) -> list[str]:
        """m larger than what a restart can fill with distinct rows is allowed, with this warning."""
        m = int(options["num_prototypes"])
        if options["npn"] != "prototype":
            return []
        present = ctx.num_samples or ctx.data_size  # distinct rows a restart can draw: samples, not ids
        limit, source = (present, "the data set") if options["restart_sampling"] == "recent" else (
            global_batch, "the global batch (restart_sampling: batch)")
        if limit and m > limit:
            return [f"num_prototypes={m} is larger than {source} ({limit}): restart rows are drawn with "
                    f"replacement plus Gaussian jitter (restart_jitter={options['restart_jitter']})"]
        return []

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        super().__init__(cfg, ctx)
        self.init_temperature()
        m, d = int(cfg["num_prototypes"]), ctx.embed_dim
        self.generator = torch.Generator().manual_seed(int(cfg["seed"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            self.npn = (PrototypeNPN(d, m, cfg["npn_matmul"]) if cfg["npn"] == "prototype"
                        else MLPNPN(d, cfg["mlp_factor"]))
        # Ring buffers of recent detached global embeddings: restart material for W1 (texts), W2 (images).
        self.register_buffer("bank_text", torch.zeros(m, d))
        self.register_buffer("bank_image", torch.zeros(m, d))
        self.register_buffer("bank_count", torch.tensor(0))
        self.register_buffer("iteration", torch.tensor(0))

    def make_inner_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adagrad(self.npn.parameters(), lr=self.cfg["npn_lr"])

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.generator.set_state(state["generator"])

    # -- the two blocks -----------------------------------------------------------------------------------
    def npn_loss(self, log_g1, log_g2, alpha1, alpha2, tau: float) -> torch.Tensor:
        if self.cfg["objective"] == "separate":
            return ((alpha1 - log_g1) ** 2 + (alpha2 - log_g2) ** 2).mean()
        return tau * (unified_terms(log_g1, alpha1) + unified_terms(log_g2, alpha2)).mean()

    @torch.no_grad()
    def _push_bank(self, all_image: torch.Tensor, all_text: torch.Tensor) -> None:
        m = self.bank_text.shape[0]
        rows = all_image.shape[0]
        pos = (int(self.bank_count) + torch.arange(rows, device=self.bank_text.device)) % m
        keep = slice(max(0, rows - m), rows)  # a batch larger than the bank: keep its last m rows
        self.bank_text[pos[keep]] = all_text[keep].to(self.bank_text.dtype)
        self.bank_image[pos[keep]] = all_image[keep].to(self.bank_image.dtype)
        self.bank_count += rows

    @torch.no_grad()
    def _draw(self, source: torch.Tensor, m: int) -> torch.Tensor:
        n = source.shape[0]
        if n >= m:
            idx = torch.randperm(n, generator=self.generator)[:m]
            return source[idx.to(source.device)]
        idx = torch.randint(n, (m,), generator=self.generator)
        noise = torch.randn(m, source.shape[1], generator=self.generator) * self.cfg["restart_jitter"]
        return source[idx.to(source.device)] + noise.to(source.device, source.dtype)

    @torch.no_grad()
    def restart(self, all_image: torch.Tensor, all_text: torch.Tensor) -> None:
        if isinstance(self.npn, PrototypeNPN):
            m = self.npn.w1.shape[0]
            if self.cfg["restart_sampling"] == "recent":
                filled = min(int(self.bank_count), m)
                texts, images = self.bank_text[:filled], self.bank_image[:filled]
            else:
                texts, images = all_text, all_image
            self.npn.w1.copy_(self._draw(texts, m))
            self.npn.w2.copy_(self._draw(images, m))
        if self.cfg["reset_adagrad"]:
            self.reset_inner_optimizer()

    def forward(self, batch: Batch) -> StepOutput:
        view = GlobalView(batch.image, batch.text, batch.ids)
        d1, d2 = view.diffs()
        tau = self.tau.to(d1.dtype)
        log_g1 = log_eps_g(d1 / tau, view.mask, self.cfg["eps"])
        log_g2 = log_eps_g(d2 / tau, view.mask, self.cfg["eps"])
        eps, t = self.cfg["eps"], int(self.iteration)
        all_image, all_text = view.all_image.detach(), view.all_text.detach()
        all_pos = (all_image.to(d1.dtype) * all_text.to(d1.dtype)).sum(1)
        tau_now = float(tau.detach())

        self._push_bank(all_image, all_text)
        every = int(self.cfg["restart_every"])
        if t == 0 or (every > 0 and t % every == 0):
            self.restart(all_image, all_text)
        simultaneous = self.cfg["updates"] == "simultaneous"
        local = slice(view.offset, view.offset + batch.image.shape[0])
        if not simultaneous:
            self._npn_block(all_image, all_text, all_pos, log_g1.detach(), log_g2.detach(), local, tau_now)
        self.iteration += 1

        if simultaneous:  # alpha keeps its graph in W only (inputs detached, docs/method.md §4): one backward
            self.inner_optimizer().zero_grad(set_to_none=True)  # feeds encoders and tau (through l) and the NPN
            alpha1, alpha2 = self.npn(all_image[local], all_text[local], all_pos[local], 1.0 / tau_now, eps)
        else:
            with torch.no_grad():
                alpha1, alpha2 = self.npn(all_image[local], all_text[local], all_pos[local], 1.0 / tau_now, eps)
        rho = self.cfg["rho"]
        terms = (unified_terms(log_g1, alpha1) + unified_terms(log_g2, alpha2)).mean()
        value = tau.detach() * terms.detach() + 2 * rho * tau.detach()
        if self.cfg["tau_grad"] == "public":
            # The FastCLIP code base's form (docs/method.md §3): d/dtau = terms/2 + rho + tau d(terms)/dtau.
            loss = gradient_neutral(tau.detach() * terms + (terms.detach() / 2 + rho) * tau, value)
        else:  # exact: d/dtau = terms + 2 rho + tau d(terms)/dtau
            loss = tau * terms + 2 * rho * tau
        with torch.no_grad():
            gap = torch.cat([alpha1 - log_g1, alpha2 - log_g2]).abs().mean()
        stats = {
            "tau": tau_now,
            "alpha1_mean": float(alpha1.detach().mean()),
            "alpha2_mean": float(alpha2.detach().mean()),
            "npn_abs_gap": float(gap),  # mean |alpha - log(eps + g_hat)| on this batch, after the NPN block
        }
        return StepOutput(loss, stats)

    def _npn_block(self, all_image, all_text, all_pos, log_g1, log_g2, local: slice, tau: float) -> None:
        """T_u AdaGrad steps on W for the unified objective (docs/method.md §4 step 5), embeddings detached."""
        _, size = world()
        sharded = self.cfg["npn_block"] == "sharded" and size > 1
        if sharded:  # this rank's anchors; mean over ranks of the local means = the global mean (equal b)
            inputs, targets = (all_image[local], all_text[local], all_pos[local]), (log_g1, log_g2)
        else:
            inputs, targets = (all_image, all_text, all_pos), (gather_no_grad(log_g1), gather_no_grad(log_g2))
        opt = self.inner_optimizer()
        params = [p for p in self.npn.parameters() if p.requires_grad]
        with torch.enable_grad():  # the NPN block trains even when the caller runs under no_grad (shadows)
            for _ in range(int(self.cfg["inner_steps"])):
                opt.zero_grad(set_to_none=True)
                a1, a2 = self.npn(*inputs, 1.0 / tau, self.cfg["eps"])
                self.npn_loss(*targets, a1, a2, tau).backward()
                if sharded:
                    _average_grads(params, size)
                opt.step()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.cfg["updates"] == "simultaneous" and self._inner_opt is not None:
            _, size = world()
            if size > 1:
                _average_grads([p for p in self.npn.parameters() if p.grad is not None], size)
            self._inner_opt.step()
            self._inner_opt.zero_grad(set_to_none=True)
        self.project_temperature()

    @torch.no_grad()
    def log_normalizers(self, image, text, ids):
        dtype = torch.promote_types(image.dtype, torch.float32)
        pos = (image.to(dtype) * text.to(dtype)).sum(1)
        a1, a2 = self.npn(image, text, pos, 1.0 / self.temperature(), self.cfg["eps"])
        return a1.float(), a2.float()


@torch.no_grad()
def _average_grads(params: list, size: int) -> None:
    """Average the parameters' gradients over ranks in one all-reduce (one flat buffer, not one per tensor)."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= size
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(part.view_as(p.grad))
