"""Every estimator's loss value and gradients against an independent float64 reference (tests/reference.py).

Shapes and temperatures vary; per-sample estimators run several steps with revisited ids so the moving
average (not only the first visit) is checked. Tolerance: 1e-6 relative to the largest reference entry.
"""

from __future__ import annotations

import math

import pytest
import torch

import tests.reference as ref
from neuclip.estimators import Batch, EstimatorContext, build_estimator

CASES = [(4, 3, 0.1), (7, 5, 0.07), (12, 8, 0.2)]
EPS = 1e-8


def close(actual, expected, rtol=1e-6):
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol} * {scale:.3e}"


def step(est, e1, e2, ids, t=0, epoch=0.0):
    x, y = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
    out = est(Batch(x, y, ids, t, epoch))
    out.loss.backward()
    return out, x.grad, y.grad


def leaves(e1, e2, tau):
    return (
        e1.clone().requires_grad_(True),
        e2.clone().requires_grad_(True),
        torch.tensor(tau, dtype=torch.float64, requires_grad=True),
    )


@pytest.mark.parametrize("B,d,tau", CASES)
def test_openclip_matches_infonce(B, d, tau):
    gen = torch.Generator().manual_seed(B)
    e1, e2 = ref.correlated_pair(B, d, gen)
    est = build_estimator("openclip", {"tau_init": tau}, EstimatorContext(embed_dim=d)).double()
    out, gx, gy = step(est, e1, e2, torch.arange(B))
    x, y, _ = leaves(e1, e2, tau)
    log_scale = torch.tensor(math.log(1 / tau), dtype=torch.float64, requires_grad=True)
    expected = ref.infonce(x, y, log_scale.exp())
    expected.backward()
    close(out.loss.detach(), expected.detach())
    close(gx, x.grad)
    close(gy, y.grad)
    close(est.logit_scale.grad, log_scale.grad)


@pytest.mark.parametrize("B,d,tau", CASES)
def test_siglip_matches_pairwise_sigmoid(B, d, tau):
    gen = torch.Generator().manual_seed(B)
    e1, e2 = ref.correlated_pair(B, d, gen)
    cfg = {"logit_scale_init": math.log(1 / tau), "logit_bias_init": -2.0}
    est = build_estimator("siglip", cfg, EstimatorContext(embed_dim=d)).double()
    out, gx, gy = step(est, e1, e2, torch.arange(B))
    x, y, _ = leaves(e1, e2, tau)
    log_scale = torch.tensor(math.log(1 / tau), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    expected = ref.siglip(x, y, log_scale.exp(), bias)
    expected.backward()
    close(out.loss.detach(), expected.detach())
    close(gx, x.grad)
    close(gy, y.grad)
    close(est.logit_scale.grad, log_scale.grad)
    close(est.logit_bias.grad, bias.grad)


def id_schedule(B, steps, gen):
    """Global batches of ids drawn from a pool of 1.5 B, so later steps revisit some ids and meet new ones."""
    pool = B + B // 2
    return [torch.randperm(pool, generator=gen)[:B] for _ in range(steps)]


GCL_VARIANTS = [
    ("sogclr", {"gamma": 0.7}, "gcl", False),
    ("fastclip", {"version": "v0", "gamma_min": 0.3}, "gcl", True),
    ("fastclip", {"version": "v1", "gamma_min": 0.3}, "gcl", False),
    ("fastclip", {"version": "v3", "gamma_min": 0.3, "rho": 6.5}, "rgclg", True),
]


@pytest.mark.parametrize("method,opts,objective,learn_tau", GCL_VARIANTS)
@pytest.mark.parametrize("B,d,tau", CASES)
def test_per_sample_gcl_and_rgclg(method, opts, objective, learn_tau, B, d, tau):
    gen = torch.Generator().manual_seed(100 + B)
    data_size = B + B // 2 + 3  # ids never seen stay NaN
    cfg = {**opts, "tau_init": tau, "tau_min": 0.001, "eps": EPS, "state_dtype": "float64"}
    ctx = EstimatorContext(embed_dim=d, data_size=data_size, total_epochs=4.0)
    est = build_estimator(method, cfg, ctx).double()
    u1, u2 = [None] * data_size, [None] * data_size
    epochs = [0.0, 1.5, 2.2]
    for t, (ids, epoch) in enumerate(zip(id_schedule(B, 3, gen), epochs)):
        e1, e2 = ref.correlated_pair(B, d, gen)
        # FastCLIP's cosine schedule over E_total = 4 epochs, on the integer epoch
        cosine = 0.3 + 0.7 * 0.5 * (1 + math.cos(math.pi * int(epoch) / 4))
        gamma = opts["gamma"] if method == "sogclr" else cosine
        if est.tau.grad is not None:
            est.tau.grad = None
        out, gx, gy = step(est, e1, e2, ids, t, epoch)

        x, y, tau_t = leaves(e1, e2, tau)
        g1, g2 = ref.g_hat(x, y, tau_t), ref.g_hat(y, x, tau_t)
        for u, g in ((u1, g1), (u2, g2)):
            new = ref.moving_average([u[i] for i in ids.tolist()], list((EPS + g).detach()), gamma)
            for i, v in zip(ids.tolist(), new):
                u[i] = v
        U1 = torch.stack([u1[i] for i in ids.tolist()])
        U2 = torch.stack([u2[i] for i in ids.tolist()])
        close(est.a1[ids], U1.log())
        close(est.a2[ids], U2.log())
        assert torch.isnan(est.a1[-3:]).all(), "never-visited ids must stay unset"
        if objective == "gcl":
            # d/d(e, tau) of log g estimated by grad(g_hat) / u with u fixed
            (g1 / U1 + g2 / U2).mean().backward()
            close(out.loss.detach(), (U1.log() + U2.log()).mean())
        else:
            rho = opts["rho"]
            (tau_t.detach() * (g1 / U1 + g2 / U2).mean()).backward()
            dtau = 2 * rho
            for anchor, other, U in ((e1, e2, U1), (e2, e1, U2)):
                for i in range(B):
                    weighted = sum(
                        torch.exp((anchor[i] @ other[j] - anchor[i] @ other[i]) / tau)
                        * (anchor[i] @ other[j] - anchor[i] @ other[i])
                        / tau
                        for j in range(B)
                        if j != i
                    )
                    dtau = dtau + (U[i].log() - weighted / ((B - 1) * U[i])) / B
            close(out.loss.detach(), tau * (U1.log() + U2.log()).mean() + 2 * rho * tau)
            close(est.tau.grad, dtau)
        close(gx, x.grad)
        close(gy, y.grad)
        if objective == "gcl" and learn_tau:
            close(est.tau.grad, tau_t.grad)
        if not learn_tau:
            assert est.tau.grad is None and est.param_groups() == []


@pytest.mark.parametrize("B,d,tau", CASES)
def test_isogclr_per_sample_temperatures(B, d, tau):
    gen = torch.Generator().manual_seed(200 + B)
    data_size = B + B // 2
    rho, lr, (b1, b2), clip = 6.5, 1e-2, (0.9, 0.999), 5.0
    cfg = {"tau_init": tau, "eps": EPS, "gamma": 0.6, "rho": rho, "tau_lr": lr, "state_dtype": "float64"}
    est = build_estimator("isogclr", cfg, EstimatorContext(embed_dim=d, data_size=data_size)).double()
    u = {1: [None] * data_size, 2: [None] * data_size}
    taus = {k: [tau] * data_size for k in (1, 2)}
    m = {k: [0.0] * data_size for k in (1, 2)}
    v = {k: [0.0] * data_size for k in (1, 2)}
    visits = [0] * data_size
    for t, ids in enumerate(id_schedule(B, 3, gen)):
        e1, e2 = ref.correlated_pair(B, d, gen)
        out, gx, gy = step(est, e1, e2, ids, t, 0.0)
        x, y = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
        idl = ids.tolist()
        for i in idl:
            visits[i] += 1
        surrogate, value = 0.0, 0.0
        for k, (anchor, other) in ((1, (x, y)), (2, (y, x))):
            tk = torch.tensor([taus[k][i] for i in idl], dtype=torch.float64)
            g = torch.stack([ref.g_hat(anchor, other, tk[i])[i] for i in range(B)])
            new = ref.moving_average([u[k][i] for i in idl], list((EPS + g).detach()), 0.6)
            for i, val in zip(idl, new):
                u[k][i] = val
            U = torch.stack(new)
            surrogate = surrogate + (tk * g / U).mean()
            value = value + (tk * (U.log() + rho)).mean()
            for row, i in enumerate(idl):  # per-sample Adam on the clamped temperature gradient
                a, o = anchor.detach()[row], other.detach()
                h = [(a @ o[j] - a @ o[row]) / tk[row] for j in range(B) if j != row]
                grad = float(U[row].log() - sum(torch.exp(hj) * hj for hj in h) / ((B - 1) * U[row]) + rho)
                grad = max(-clip, min(clip, grad))
                m[k][i] = b1 * m[k][i] + (1 - b1) * grad
                v[k][i] = b2 * v[k][i] + (1 - b2) * grad * grad
                m_hat, v_hat = m[k][i] / (1 - b1 ** visits[i]), v[k][i] / (1 - b2 ** visits[i])
                taus[k][i] = min(1.0, max(0.01, taus[k][i] - lr * m_hat / (math.sqrt(v_hat) + 1e-8)))
            close(getattr(est, f"a{k}")[ids], U.log())
            close(getattr(est, f"tau{k}")[ids], torch.tensor([taus[k][i] for i in idl], dtype=torch.float64))
        surrogate.backward()
        close(out.loss.detach(), value)
        close(gx, x.grad)
        close(gy, y.grad)


@pytest.mark.parametrize("B,d,tau", CASES)
def test_neuclip_encoder_block_matches_unified_objective(B, d, tau):
    gen = torch.Generator().manual_seed(300 + B)
    rho, m = 6.5, 6
    cfg = {"tau_init": tau, "eps": EPS, "rho": rho, "num_prototypes": m, "inner_steps": 0, "restart_every": 0}
    est = build_estimator("neuclip", cfg, EstimatorContext(embed_dim=d)).double()
    for t in range(2):
        e1, e2 = ref.correlated_pair(B, d, gen)
        est.tau.grad = None
        out, gx, gy = step(est, e1, e2, torch.arange(B), t)
        x, y, tau_t = leaves(e1, e2, tau)
        pos = (e1 * e2).sum(1)
        a1 = ref.npn_alpha(e1, est.npn.w1.detach(), pos, tau, EPS)
        a2 = ref.npn_alpha(e2, est.npn.w2.detach(), pos, tau, EPS)
        close(torch.stack(est.log_normalizers(e1, e2, torch.arange(B))), torch.stack([a1, a2]), rtol=1e-5)
        g1, g2 = ref.g_hat(x, y, tau_t), ref.g_hat(y, x, tau_t)
        expected = tau_t * (torch.exp(-a1) * (EPS + g1) + a1 - 1 + torch.exp(-a2) * (EPS + g2) + a2 - 1).mean()
        expected = expected + 2 * rho * tau_t
        expected.backward()
        close(out.loss.detach(), expected.detach())
        close(gx, x.grad)
        close(gy, y.grad)
        close(est.tau.grad, tau_t.grad)


@pytest.mark.parametrize("B,d,tau", CASES)
def test_neuclip_npn_block_is_one_adagrad_step_on_the_unified_objective(B, d, tau):
    gen = torch.Generator().manual_seed(400 + B)
    lr, m = 0.05, 5
    cfg = {"tau_init": tau, "eps": EPS, "num_prototypes": m, "inner_steps": 0, "restart_every": 0, "npn_lr": lr}
    est = build_estimator("neuclip", cfg, EstimatorContext(embed_dim=d)).double()
    step(est, *ref.correlated_pair(B, d, gen), torch.arange(B), 0)  # t = 0: restart only
    w1, w2 = (est.npn.w1.detach().clone().requires_grad_(True), est.npn.w2.detach().clone().requires_grad_(True))
    est.cfg["inner_steps"] = 1
    e1, e2 = ref.correlated_pair(B, d, gen)
    step(est, e1, e2, torch.arange(B), 1)
    pos = (e1 * e2).sum(1)
    g1, g2 = ref.g_hat(e1, e2, tau), ref.g_hat(e2, e1, tau)
    a1, a2 = ref.npn_alpha(e1, w1, pos, tau, EPS), ref.npn_alpha(e2, w2, pos, tau, EPS)
    (tau * (torch.exp(-a1) * (EPS + g1) + a1 + torch.exp(-a2) * (EPS + g2) + a2).mean()).backward()
    for w, new in ((w1, est.npn.w1), (w2, est.npn.w2)):
        # AdaGrad's first step from a fresh state: w - lr * g / (sqrt(g^2) + 1e-10)
        expected = w.detach() - lr * w.grad / (w.grad.abs() + 1e-10)
        close(new.detach(), expected)


def test_amorlip_encoder_block_uses_ema_lambda():
    B, d, tau, rho = 8, 5, 0.1, 6.5
    gen = torch.Generator().manual_seed(7)
    cfg = {"tau_init": tau, "eps": EPS, "rho": rho, "ema_decay": 0.5}
    est = build_estimator("amorlip", cfg, EstimatorContext(embed_dim=d, total_steps=10)).double()
    for t in range(2):
        e1, e2 = ref.correlated_pair(B, d, gen)
        est.tau.grad = None
        out, gx, gy = step(est, e1, e2, torch.arange(B), t)
        lam1, lam2 = (a.double() for a in est.log_normalizers(e1, e2, torch.arange(B)))
        x, y, tau_t = leaves(e1, e2, tau)
        g1, g2 = ref.g_hat(x, y, tau_t), ref.g_hat(y, x, tau_t)
        expected = tau_t * (torch.exp(-lam1) * (EPS + g1) + lam1 - 1 + torch.exp(-lam2) * (EPS + g2) + lam2 - 1).mean()
        expected = expected + rho * tau_t
        expected.backward()
        close(out.loss.detach(), expected.detach(), rtol=1e-5)  # lambda was read back in float32
        close(gx, x.grad, rtol=1e-5)
        close(gy, y.grad, rtol=1e-5)
        close(est.tau.grad, tau_t.grad, rtol=1e-5)
