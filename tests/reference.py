"""Independent float64 references for the estimator tests, written plainly from docs/method.md's formulas.

Deliberately loop-based and in linear space (no log-sum-exp tricks) so they share no code with the package;
inputs are kept moderate (tau >= 0.05 and unit vectors) so exp() cannot overflow in float64.
"""

from __future__ import annotations

import torch


def g_hat(anchor: torch.Tensor, other: torch.Tensor, tau) -> torch.Tensor:
    """g_hat_i = 1/(B-1) sum_{j != i} exp((a_i . o_j - a_i . o_i) / tau), one loop over anchors."""
    B = anchor.shape[0]
    out = []
    for i in range(B):
        total = 0.0
        for j in range(B):
            if j != i:
                total = total + torch.exp((anchor[i] @ other[j] - anchor[i] @ other[i]) / tau)
        out.append(total / (B - 1))
    return torch.stack(out)


def infonce(e1, e2, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE, the OpenCLIP mini-batch loss: mean over both directions of -log softmax."""
    B = e1.shape[0]
    s = e1 @ e2.T * logit_scale
    loss = 0.0
    for i in range(B):
        loss = loss - torch.log(torch.exp(s[i, i]) / torch.exp(s[i]).sum())
        loss = loss - torch.log(torch.exp(s[i, i]) / torch.exp(s[:, i]).sum())
    return loss / (2 * B)


def siglip(e1, e2, logit_scale, bias) -> torch.Tensor:
    B = e1.shape[0]
    loss = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            loss = loss - torch.log(torch.sigmoid(z * (logit_scale * (e1[i] @ e2[j]) + bias)))
    return loss / B


def moving_average(u_old, target, gamma):
    """u <- (1 - gamma) u + gamma * target in linear space; None (never visited) -> target."""
    return [t if u is None else (1 - gamma) * u + gamma * t for u, t in zip(u_old, target)]


def npn_alpha(anchor, prototypes, pos, tau, eps) -> torch.Tensor:
    """alpha_i = log(eps + 1/m sum_p exp((cos(anchor_i, W_p) - s_ii) / tau))."""
    w = prototypes / prototypes.norm(dim=1, keepdim=True)
    out = []
    for i in range(anchor.shape[0]):
        mean = sum(torch.exp((anchor[i] @ w[p] - pos[i]) / tau) for p in range(w.shape[0])) / w.shape[0]
        out.append(torch.log(eps + mean))
    return torch.stack(out)


def rgclg(e1, e2, tau, eps, rho) -> torch.Tensor:
    """The RGCL-g mini-batch loss tau/B sum_i [log(eps + g1_i) + log(eps + g2_i)] + 2 rho tau."""
    return tau * (torch.log(eps + g_hat(e1, e2, tau)) + torch.log(eps + g_hat(e2, e1, tau))).mean() + 2 * rho * tau


def unit(n: int, d: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True)


def correlated_pair(n: int, d: int, gen: torch.Generator, noise: float = 0.5):
    """Image/text embeddings whose positives are more similar than negatives, like a trained model's."""
    base = torch.randn(n, d, generator=gen, dtype=torch.float64)
    e1 = base + noise * torch.randn(n, d, generator=gen, dtype=torch.float64)
    e2 = base + noise * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return e1 / e1.norm(dim=1, keepdim=True), e2 / e2.norm(dim=1, keepdim=True)


def log_batch_sum(anchor, other, tau, pos_coef) -> torch.Tensor:
    """AmorLIP's absolute-scale target (docs/method.md §5):
    log( sum_{j != i} exp(a_i.o_j / tau) + c exp(a_i.o_i / tau) )."""
    out = []
    for i in range(anchor.shape[0]):
        total = pos_coef * torch.exp(anchor[i] @ other[i] / tau)
        for j in range(other.shape[0]):
            if j != i:
                total = total + torch.exp(anchor[i] @ other[j] / tau)
        out.append(torch.log(total))
    return torch.stack(out)


def amorlip_encoder_loss(e1, e2, tau, log_w1, log_w2, pos_coef, rho) -> torch.Tensor:
    """The public AmorLIP encoder loss with detached weights w (docs/method.md §5), with tau_det from `tau`:
    tau_det [ -2 mean_i z_ii + sum_k mean_i sum_j exp(z_kij) c^[j=i] / w_k_i ] + rho tau,  z = s / tau."""
    B = e1.shape[0]
    total = 0.0
    for i in range(B):
        total = total - 2 * (e1[i] @ e2[i]) / tau
        for anchor, other, log_w in ((e1, e2, log_w1), (e2, e1, log_w2)):
            row = 0.0
            for j in range(B):
                weight = pos_coef if j == i else 1.0
                row = row + weight * torch.exp(anchor[i] @ other[j] / tau)
            total = total + row / torch.exp(log_w[i])
    return tau.detach() * total / B + rho * tau
