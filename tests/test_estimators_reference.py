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
    ("fastclip", {"version": "v3", "gamma_min": 0.3, "rho": 6.5, "tau_grad": "exact"}, "rgclg", True),
    ("fastclip", {"version": "v3", "gamma_min": 0.3, "rho": 6.5, "tau_grad": "public"}, "rgclg", True),
]


@pytest.mark.parametrize("method,opts,objective,learn_tau", GCL_VARIANTS)
@pytest.mark.parametrize("B,d,tau", CASES)
def test_per_sample_gcl_and_rgclg(method, opts, objective, learn_tau, B, d, tau):
    gen = torch.Generator().manual_seed(100 + B)
    data_size = B + B // 2 + 3  # ids never seen stay NaN
    cfg = {**opts, "tau_init": tau, "eps": EPS, "state_dtype": "float64"}
    if method == "fastclip":
        cfg["tau_min"] = 0.001
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
            # docs/method.md §3: exact = mean(a1 + a2) + 2 rho - (W1 + W2); public = mean(a1 + a2)/2 + rho - (W1 + W2)
            public = opts["tau_grad"] == "public"
            dtau = rho if public else 2 * rho
            for anchor, other, U in ((e1, e2, U1), (e2, e1, U2)):
                for i in range(B):
                    weighted = sum(
                        torch.exp((anchor[i] @ other[j] - anchor[i] @ other[i]) / tau)
                        * (anchor[i] @ other[j] - anchor[i] @ other[i])
                        / tau
                        for j in range(B)
                        if j != i
                    )
                    dtau = dtau + (U[i].log() / (2 if public else 1) - weighted / ((B - 1) * U[i])) / B
            close(out.loss.detach(), tau * (U1.log() + U2.log()).mean() + 2 * rho * tau)
            close(est.tau.grad, dtau)
        close(gx, x.grad)
        close(gy, y.grad)
        if objective == "gcl" and learn_tau:
            close(est.tau.grad, tau_t.grad)
        if not learn_tau:
            assert est.tau.grad is None and est.param_groups() == []


ISOGCLR_EPOCHS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]  # revisits within epoch 0 and across epochs


@pytest.mark.parametrize("tau_adam,encoder_weight", [("public", "public"), ("per_visit", "tau_scaled")])
@pytest.mark.parametrize("B,d,tau", CASES)
def test_isogclr_per_sample_temperatures(B, d, tau, tau_adam, encoder_weight):
    """public (fast_clip's FastCLIPLossIndividual): the per-sample Adam has betas 0 throughout epoch 0 and is
    bias-corrected by the epoch, E + 1; the encoder's gradient is that of log g_i at fixed tau_i. The former
    forms: betas from the first visit with the visit count, and that gradient times tau_i."""
    gen = torch.Generator().manual_seed(200 + B)
    data_size = B + B // 2
    rho, lr, (b1, b2), clip = 6.5, 1e-2, (0.9, 0.999), 5.0
    cfg = {"tau_init": tau, "eps": EPS, "gamma": 0.6, "rho": rho, "tau_lr": lr, "state_dtype": "float64",
           "tau_adam": tau_adam, "encoder_weight": encoder_weight}
    est = build_estimator("isogclr", cfg, EstimatorContext(embed_dim=d, data_size=data_size)).double()
    u = {1: [None] * data_size, 2: [None] * data_size}
    taus = {k: [tau] * data_size for k in (1, 2)}
    m = {k: [0.0] * data_size for k in (1, 2)}
    v = {k: [0.0] * data_size for k in (1, 2)}
    visits = [0] * data_size
    for t, ids in enumerate(id_schedule(B, len(ISOGCLR_EPOCHS), gen)):
        epoch = ISOGCLR_EPOCHS[t]
        e1, e2 = ref.correlated_pair(B, d, gen)
        out, gx, gy = step(est, e1, e2, ids, t, epoch)
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
            surrogate = surrogate + ((g / U) if encoder_weight == "public" else (tk * g / U)).mean()
            value = value + (tk * (U.log() + rho)).mean()
            for row, i in enumerate(idl):  # per-sample Adam on the clamped temperature gradient
                a, o = anchor.detach()[row], other.detach()
                h = [(a @ o[j] - a @ o[row]) / tk[row] for j in range(B) if j != row]
                grad = float(U[row].log() - sum(torch.exp(hj) * hj for hj in h) / ((B - 1) * U[row]) + rho)
                grad = max(-clip, min(clip, grad))
                if tau_adam == "public":
                    beta1, beta2 = (0.0, 0.0) if epoch < 1 else (b1, b2)
                    count = math.floor(epoch) + 1
                else:
                    (beta1, beta2), count = (b1, b2), visits[i]
                m[k][i] = beta1 * m[k][i] + (1 - beta1) * grad
                v[k][i] = beta2 * v[k][i] + (1 - beta2) * grad * grad
                m_hat, v_hat = m[k][i] / (1 - beta1**count), v[k][i] / (1 - beta2**count)
                taus[k][i] = min(1.0, max(0.01, taus[k][i] - lr * m_hat / (math.sqrt(v_hat) + 1e-8)))
            close(getattr(est, f"a{k}")[ids], U.log())
            close(getattr(est, f"tau{k}")[ids], torch.tensor([taus[k][i] for i in idl], dtype=torch.float64))
        surrogate.backward()
        close(out.loss.detach(), value)
        close(gx, x.grad)
        close(gy, y.grad)


def test_isogclr_public_and_former_forms_part_after_epoch_0():
    """The two temperature optimisers agree on a sample's first visit and differ from epoch 1 on; the two encoder
    weights differ by the per-anchor factor tau_i (so at one tau for every sample, by that constant)."""
    B, d, tau = 6, 4, 0.05
    gen = torch.Generator().manual_seed(3)
    batches = [ref.correlated_pair(B, d, gen) for _ in range(2)]
    results = {}
    for form in (("public", "public"), ("per_visit", "tau_scaled")):
        cfg = {"tau_init": tau, "eps": EPS, "rho": 6.5, "tau_lr": 1e-2, "state_dtype": "float64",
               "tau_adam": form[0], "encoder_weight": form[1]}
        est = build_estimator("isogclr", cfg, EstimatorContext(embed_dim=d, data_size=B)).double()
        _, gx, _ = step(est, *batches[0], torch.arange(B), 0, 0.0)
        first = est.tau1.clone()
        step(est, *batches[1], torch.arange(B), 1, 1.0)
        results[form[0]] = (gx, first, est.tau1.clone())
    (gx_pub, first_pub, second_pub), (gx_old, first_old, second_old) = results["public"], results["per_visit"]
    close(gx_old, tau * gx_pub, rtol=1e-12)
    assert torch.equal(first_pub, first_old)
    assert (second_pub - second_old).abs().max() > 1e-6


@pytest.mark.parametrize("tau_grad", ["exact", "public"])
@pytest.mark.parametrize("B,d,tau", CASES)
def test_neuclip_encoder_block_matches_unified_objective(B, d, tau, tau_grad):
    gen = torch.Generator().manual_seed(300 + B)
    rho, m = 6.5, 6
    cfg = {"tau_init": tau, "eps": EPS, "rho": rho, "num_prototypes": m, "restart_every": 0, "tau_grad": tau_grad}
    est = build_estimator("neuclip", cfg, EstimatorContext(embed_dim=d)).double()
    est.cfg["inner_steps"] = 0  # freeze the NPN, so its alphas can be read back and used by the reference
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
        terms = (torch.exp(-a1) * (EPS + g1) + a1 - 1 + torch.exp(-a2) * (EPS + g2) + a2 - 1).mean()
        expected = tau_t * terms + 2 * rho * tau_t
        (d_terms,) = torch.autograd.grad(terms, tau_t, retain_graph=True)
        expected.backward()
        close(out.loss.detach(), expected.detach())
        close(gx, x.grad)
        close(gy, y.grad)
        if tau_grad == "exact":  # the gradient of the unified objective itself
            close(est.tau.grad, tau_t.grad)
        else:  # docs/method.md §3's public form: terms / 2 + rho + tau d(terms)/dtau
            close(est.tau.grad, terms.detach() / 2 + rho + tau * d_terms)


@pytest.mark.parametrize("B,d,tau", CASES)
def test_neuclip_npn_block_is_one_adagrad_step_on_the_unified_objective(B, d, tau):
    gen = torch.Generator().manual_seed(400 + B)
    lr, m = 0.05, 5
    cfg = {"tau_init": tau, "eps": EPS, "num_prototypes": m, "restart_every": 0, "npn_lr": lr}
    est = build_estimator("neuclip", cfg, EstimatorContext(embed_dim=d)).double()
    est.cfg["inner_steps"] = 0
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


def amorlip(cfg, d, B):
    ctx = EstimatorContext(embed_dim=d, total_steps=10, total_epochs=4.0, steps_per_epoch=2)
    return build_estimator("amorlip", cfg, ctx).double()


def log_scale_leaf(tau):
    return torch.tensor(math.log(1 / tau), dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("adaptive_tau", [False, True])
@pytest.mark.parametrize("B,d,tau", CASES)
def test_amorlip_epoch0_weights_are_the_batch_sums(B, d, tau, adaptive_tau):
    """fit_w_prev in epoch 0 (beta = 0): the lambda target and the encoder's weight are the absolute-scale batch
    sums log Z; the encoder loss, its embedding and log(1/tau) gradients follow the public form (§5)."""
    gen = torch.Generator().manual_seed(500 + B)
    rho, c = 6.5, 1e-3
    est = amorlip({"tau_init": tau, "rho": rho, "pos_coef": c, "adaptive_tau": adaptive_tau}, d, B)
    est.on_epoch_start(0)
    e1, e2 = ref.correlated_pair(B, d, gen)
    out, gx, gy = step(est, e1, e2, torch.arange(B), 0, 0.0)
    x, y = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
    ls = log_scale_leaf(tau)
    tau_t = torch.exp(-ls)
    log_z1 = ref.log_batch_sum(e1, e2, tau, c)
    log_z2 = ref.log_batch_sum(e2, e1, tau, c)
    loss = ref.amorlip_encoder_loss(x, y, tau_t, log_z1, log_z2, c, rho)
    if adaptive_tau:  # the public --adaptive_tau term: tau * (mean(log w1 + log w2) - 2 log B - 2 mean z_ii)
        pos = torch.stack([e1[i] @ e2[i] for i in range(B)]) / tau
        loss = loss + tau_t * float((log_z1 + log_z2).mean() - 2 * math.log(B) - 2 * pos.mean())
    loss.backward()
    close(gx, x.grad)
    close(gy, y.grad)
    close(est.logit_scale.grad, ls.grad)
    assert out.stats["beta"] == 0.0


@pytest.mark.parametrize("B,d,tau", CASES)
def test_amorlip_adaptive_tau_is_the_exact_gradient_of_its_objective(B, d, tau):
    """At w = Z (epoch 0), the adaptive form's tau gradient equals d/dtau of AmorLIP's own objective
    tau sum_k mean_i log( 1/B sum_j exp(h_kij) c^[j=i] ) + rho tau: the public form uses 1/B, not §1's 1/(B-1)."""
    gen = torch.Generator().manual_seed(600 + B)
    rho, c = 6.5, 1e-3
    est = amorlip({"tau_init": tau, "rho": rho, "pos_coef": c, "adaptive_tau": True}, d, B)
    est.on_epoch_start(0)
    e1, e2 = ref.correlated_pair(B, d, gen)
    step(est, e1, e2, torch.arange(B), 0, 0.0)
    tau_t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    objective = rho * tau_t
    for anchor, other in ((e1, e2), (e2, e1)):
        for i in range(B):
            row = sum((c if j == i else 1.0) * torch.exp((anchor[i] @ other[j] - anchor[i] @ other[i]) / tau_t)
                      for j in range(B))
            objective = objective + tau_t * torch.log(row / B) / B
    objective.backward()
    # the estimator learns log(1/tau): d/d(log scale) = -tau d/dtau
    close(est.logit_scale.grad, -tau * tau_t.grad)


def test_amorlip_later_epochs_mix_the_frozen_snapshot():
    """fit_w_prev after epoch 0: the weight is log(beta_E lambda_prev + (1 - beta_E) Z), lambda_prev the EMA nets
    frozen at the epoch start, beta_E the public cosine rise (here E = 1 of decay 2: beta = beta_max / 2)."""
    B, d, tau, rho, c, beta_max = 8, 5, 0.1, 6.5, 1e-3, 0.8
    gen = torch.Generator().manual_seed(7)
    est = amorlip({"tau_init": tau, "rho": rho, "pos_coef": c, "beta_max": beta_max, "beta_decay_epochs": 2}, d, B)
    est.on_epoch_start(0)
    step(est, *ref.correlated_pair(B, d, gen), torch.arange(B), 0, 0.0)
    est.on_epoch_start(1)
    e1, e2 = ref.correlated_pair(B, d, gen)
    prev1, prev2 = (p.double().detach() for p in est.prev(e1, e2, None, None, 0.0))
    out, gx, gy = step(est, e1, e2, torch.arange(B), 1, 1.0)
    beta = beta_max - beta_max * 0.5 * (1 + math.cos(math.pi * 1 / 2))
    assert out.stats["beta"] == pytest.approx(beta) and beta == pytest.approx(0.4)
    log_w1 = torch.log(beta * torch.exp(prev1) + (1 - beta) * torch.exp(ref.log_batch_sum(e1, e2, tau, c)))
    log_w2 = torch.log(beta * torch.exp(prev2) + (1 - beta) * torch.exp(ref.log_batch_sum(e2, e1, tau, c)))
    x, y = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
    ref.amorlip_encoder_loss(x, y, torch.tensor(tau, dtype=torch.float64), log_w1, log_w2, c, rho).backward()
    close(gx, x.grad, rtol=1e-5)  # lambda_prev is a float32 net
    close(gy, y.grad, rtol=1e-5)


@pytest.mark.parametrize("ema_query", ["before_update", "after_update"])
def test_amorlip_ema_mode_reads_then_updates_the_ema_nets(ema_query):
    """ema mode, as the public code orders a step: lambda-net fit, the encoder's weight from the EMA nets, then
    the EMA update p_ema <- beta_E p_ema + (1 - beta_E) p_online at every ema_every-th step of the epoch (counted
    from the epoch start). `after_update`, the former order, reads the nets after that update."""
    B, d, tau, rho, c = 8, 5, 0.1, 6.5, 1e-3
    gen = torch.Generator().manual_seed(8)
    est = amorlip({"tau_init": tau, "rho": rho, "pos_coef": c, "mode": "ema", "ema_every": 2,
                   "beta_decay_epochs": 2, "ema_query": ema_query, "reinit_every_epochs": 0}, d, B)
    est.on_epoch_start(0)
    step(est, *ref.correlated_pair(B, d, gen), torch.arange(B), 0, 0.0)
    est.on_epoch_start(1)  # beta_1 = beta_max / 2 = 0.4; the nets are kept (no re-initialisation)
    beta = 0.4
    for t in range(3):
        e1, e2 = ref.correlated_pair(B, d, gen)
        ema_before = [p.detach().double().clone() for p in est.target.parameters()]
        lam_before = [p.double().detach() for p in est.target(e1, e2, None, None, 0.0)]
        out, gx, gy = step(est, e1, e2, torch.arange(B), 1 + t, 1.0 + t / 10)
        online = [p.detach().double() for p in est.online.parameters()]
        expected = [beta * e + (1 - beta) * o for e, o in zip(ema_before, online)] if t % 2 == 0 else ema_before
        for p, want in zip(est.target.parameters(), expected):
            close(p.detach(), want, rtol=1e-6)
        lam_after = [p.double().detach() for p in est.target(e1, e2, None, None, 0.0)]
        lam1, lam2 = lam_before if ema_query == "before_update" else lam_after
        x, y = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
        ref.amorlip_encoder_loss(x, y, torch.tensor(tau, dtype=torch.float64), lam1, lam2, c, rho).backward()
        close(gx, x.grad, rtol=1e-5)
        close(gy, y.grad, rtol=1e-5)
        if t % 2 == 0:  # the two orders differ where an update happened
            other = lam_after if ema_query == "before_update" else lam_before
            assert (other[0] - lam1).abs().max() > 1e-6


@pytest.mark.parametrize("clip", [1.0, None])
def test_amorlip_lambda_steps_clip_the_nets_gradient_norm(clip):
    """Each inner Adam step of the lambda-nets clips their gradient norm to lambda_grad_clip (README 1.0), as the
    public code's --grad-clip-norm does: replayed on a copy of the nets with torch's Adam and clip_grad_norm_."""
    import copy

    B, d, tau, c = 8, 5, 0.1, 1e-3
    gen = torch.Generator().manual_seed(11)
    est = amorlip({"tau_init": tau, "pos_coef": c, "lambda_lr": 0.05, "lambda_grad_clip": clip}, d, B)
    est.on_epoch_start(0)
    step(est, *ref.correlated_pair(B, d, gen), torch.arange(B), 0, 0.0)  # after the bias initialisation
    nets = copy.deepcopy(est.online)
    opt = torch.optim.Adam(nets.parameters(), lr=0.05)
    opt.load_state_dict(copy.deepcopy(est.inner_optimizer().state_dict()))  # load_state_dict shares tensors
    e1, e2 = ref.correlated_pair(B, d, gen)
    targets = (ref.log_batch_sum(e1, e2, tau, c), ref.log_batch_sum(e2, e1, tau, c))  # epoch 0: beta = 0
    norms = []
    for _ in range(3):
        opt.zero_grad()
        p1, p2 = nets(e1, e2, None, None, 0.0)
        (((p1 - targets[0]) ** 2).mean() + ((p2 - targets[1]) ** 2).mean()).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in nets.parameters()])))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(nets.parameters(), clip)
        opt.step()
    assert max(norms) > 1.0  # the clip is active in this case
    step(est, e1, e2, torch.arange(B), 1, 0.5)
    for mine, theirs in zip(est.online.parameters(), nets.parameters()):
        close(mine.detach(), theirs.detach(), rtol=1e-5)


def test_amorlip_alpha_is_on_section_1_scale():
    """log_normalizers converts the EMA nets' log lambda (absolute scale) to alpha = log lambda - z_ii - log(B - 1)."""
    B, d, tau = 8, 5, 0.1
    gen = torch.Generator().manual_seed(9)
    est = amorlip({"tau_init": tau}, d, B)
    est.on_epoch_start(0)
    e1, e2 = ref.correlated_pair(B, d, gen)
    step(est, e1, e2, torch.arange(B), 0, 0.0)
    lam1, lam2 = (p.double() for p in est.target(e1, e2, None, None, 0.0))
    pos = torch.stack([e1[i] @ e2[i] for i in range(B)]) / tau
    a1, a2 = (a.double() for a in est.log_normalizers(e1, e2, torch.arange(B)))
    close(a1, lam1 - pos - math.log(B - 1), rtol=1e-5)
    close(a2, lam2 - pos - math.log(B - 1), rtol=1e-5)
