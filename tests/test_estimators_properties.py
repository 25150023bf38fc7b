"""Properties docs/method.md promises: the convex reformulation, the envelope, schedules, numerics, state."""

from __future__ import annotations

import io
import math

import pytest
import torch

import tests.reference as ref
from baselines.per_sample import cosine_gamma, default_gamma_min, moving_average_log
from neuclip.estimators import Batch, EstimatorContext, build_estimator, method_names
from neuclip.estimators.options import OptionError
from neuclip.neuclip import unified_terms

EPS = 1e-8


def close(actual, expected, rtol=1e-6):
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    err, scale = (actual - expected).abs().max(), expected.abs().max().clamp_min(1e-12)
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol} * {scale:.3e}"


def test_log_is_the_minimum_of_the_unified_terms():
    gen = torch.Generator().manual_seed(0)
    log_x = torch.randn(1000, generator=gen, dtype=torch.float64) * 5
    alpha = torch.randn(1000, generator=gen, dtype=torch.float64) * 5
    assert (unified_terms(log_x, alpha) >= log_x - 1e-12).all()
    close(unified_terms(log_x, log_x), log_x)


def test_mirror_descent_on_alpha_is_the_moving_average():
    """docs/method.md §4 step 1: a mirror step with map e^alpha and step gamma e^alpha is the SogCLR update."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        alpha = (torch.randn(5, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
        log_target = torch.randn(5, generator=gen, dtype=torch.float64) * 3  # log(eps + g_hat)
        gamma = float(torch.rand(1, generator=gen))
        unified_terms(log_target, alpha).sum().backward()
        # grad phi(alpha_new) = grad phi(alpha) - eta * grad f, phi = exp, eta = gamma exp(alpha)
        mirror = torch.log(alpha.exp() - gamma * alpha.exp() * alpha.grad).detach()
        close(moving_average_log(alpha.detach(), log_target, gamma), mirror, rtol=1e-9)


def test_first_visit_and_gamma_one_take_the_batch_value():
    log_target = torch.tensor([0.5, -2.0, 7.0], dtype=torch.float64)
    old = torch.tensor([math.nan, 1.0, 3.0], dtype=torch.float64)
    out = moving_average_log(old, log_target, 0.3)
    assert out[0] == log_target[0]
    close(out[1:], torch.log(0.7 * old[1:].exp() + 0.3 * log_target[1:].exp()), rtol=1e-12)
    close(moving_average_log(old, log_target, 1.0), log_target, rtol=0)


def test_fastclip_gamma_schedule_values():
    assert cosine_gamma(0.0, 0.2, 18) == 1.0 and cosine_gamma(0.99, 0.2, 18) == 1.0  # epoch 0: gamma = 1
    close(cosine_gamma(9.5, 0.2, 18), 0.6)  # integer epoch 9 of 18: half way, (1 + 0.2) / 2
    assert cosine_gamma(18.0, 0.2, 18) == 0.2 and cosine_gamma(30.0, 0.2, 18) == 0.2
    close(default_gamma_min(37), 4.177 * 37**-0.7265)
    assert default_gamma_min(1) == 1.0
    est = build_estimator("fastclip", {}, EstimatorContext(embed_dim=4, data_size=4, total_epochs=33))
    close(
        est.gamma(16.0), 0.5 * (1 + math.cos(math.pi * 16 / 33)) * (1 - default_gamma_min(33)) + default_gamma_min(33)
    )


class OracleNPN(torch.nn.Module):
    """Predicts the exact mini-batch log(eps + g_hat) of the batch it was given: alpha at the envelope point."""

    def __init__(self, tau):
        super().__init__()
        self.tau, self.weight = tau, torch.nn.Parameter(torch.zeros(1))

    def forward(self, image, text, pos, scale, eps):
        g1, g2 = ref.g_hat(image.detach(), text.detach(), self.tau), ref.g_hat(text.detach(), image.detach(), self.tau)
        return torch.log(eps + g1) + 0 * self.weight, torch.log(eps + g2) + 0 * self.weight


@pytest.mark.parametrize("B,d,tau", [(5, 4, 0.1), (9, 6, 0.07)])
def test_neuclip_envelope_equals_rgclg(B, d, tau):
    rho = 6.5
    gen = torch.Generator().manual_seed(B)
    cfg = {"tau_init": tau, "eps": EPS, "rho": rho, "num_prototypes": 8, "restart_every": 0, "tau_grad": "exact"}
    est = build_estimator("neuclip", cfg, EstimatorContext(embed_dim=d)).double()
    est.cfg["inner_steps"] = 0  # keep the random prototypes: "any alpha"
    e1, e2 = ref.correlated_pair(B, d, gen)
    # any alpha: the unified loss bounds RGCL-g from above
    x, y = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
    loss_any = est(Batch(x, y, torch.arange(B), 0, 0.0)).loss
    assert float(loss_any.detach()) >= float(ref.rgclg(e1, e2, tau, EPS, rho)) - 1e-12
    # alpha = log(eps + g_hat): same value and same gradients (envelope theorem)
    est.npn = OracleNPN(tau)
    est.tau.grad = None
    x, y = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
    out = est(Batch(x, y, torch.arange(B), 1, 0.0))
    out.loss.backward()
    rx, ry = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
    rtau = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    expected = ref.rgclg(rx, ry, rtau, EPS, rho)
    expected.backward()
    close(out.loss.detach(), expected.detach())
    close(x.grad, rx.grad)
    close(y.grad, ry.grad)
    close(est.tau.grad, rtau.grad)


def test_neuclip_inner_steps_reduce_alpha_error():
    B, d, tau = 64, 8, 0.1
    gen = torch.Generator().manual_seed(3)
    e1, e2 = ref.correlated_pair(B, d, gen)
    exact = torch.log(EPS + ref.g_hat(e1, e2, tau)), torch.log(EPS + ref.g_hat(e2, e1, tau))
    errors = []
    for inner in (0, 10, 50):
        cfg = {"tau_init": tau, "eps": EPS, "num_prototypes": 32, "restart_every": 0}
        est = build_estimator("neuclip", cfg, EstimatorContext(embed_dim=d)).double()
        est.cfg["inner_steps"] = inner  # 0 is not a valid setting; here it is the "no NPN steps" baseline
        est(Batch(e1, e2, torch.arange(B), 0, 0.0))
        a1, a2 = est.log_normalizers(e1, e2, torch.arange(B))
        errors.append(float(((a1 - exact[0]) ** 2 + (a2 - exact[1]) ** 2).mean()))
    assert errors[1] < 0.7 * errors[0] and errors[2] < errors[1], errors


CONTRASTIVE = ["openclip", "sogclr", "isogclr", "fastclip", "amorlip", "neuclip"]


def small_ctx(d=8, n=64):
    return EstimatorContext(embed_dim=d, data_size=n, total_epochs=2, total_steps=20, steps_per_epoch=10)


def opts(method):
    return {"num_prototypes": 16} if method == "neuclip" else {}


@pytest.mark.parametrize("method", CONTRASTIVE)
def test_no_overflow_at_smallest_temperature(method):
    """tau = 0.01 puts h_ij up to 200: exp() would overflow float32; the log-space maths must not."""
    gen = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=1)
    y = -x.clone()  # positives anti-aligned: s_ij - s_ii as large as 2, h = 200
    y[:, 0] += 0.01
    est = build_estimator(method, {**opts(method), "tau_init": 0.01}, small_ctx())
    xs, ys = x.clone().requires_grad_(True), torch.nn.functional.normalize(y, dim=1).requires_grad_(True)
    out = est(Batch(xs, ys, torch.arange(16), 0, 0.0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(xs.grad).all() and torch.isfinite(ys.grad).all()
    assert all(math.isfinite(v) for v in out.stats.values())


@pytest.mark.parametrize("method", CONTRASTIVE)
def test_bf16_embeddings_keep_fp32_state(method):
    gen = torch.Generator().manual_seed(6)
    x = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=1).bfloat16().requires_grad_(True)
    y = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=1).bfloat16().requires_grad_(True)
    est = build_estimator(method, opts(method), small_ctx())
    out = est(Batch(x, y, torch.arange(16), 0, 0.0))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    for name, tensor in est.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name


def test_ids_beyond_data_size_are_a_clear_error():
    est = build_estimator("fastclip", {}, small_ctx(n=10))
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(IndexError, match="sample id 12 outside"):
        est(Batch(x, x.flip(0), torch.tensor([1, 2, 3, 12]), 0, 0.0))


def test_unknown_option_and_method_names_are_listed():
    with pytest.raises(OptionError, match="known options"):
        build_estimator("neuclip", {"num_protoypes": 3}, small_ctx())
    with pytest.raises(KeyError, match="known methods"):
        build_estimator("neuclp", {}, small_ctx())


def run_steps(est, batches, start):
    outs = []
    for t, (x, y, ids) in enumerate(batches, start=start):
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        out = est(Batch(xs, ys, ids, t, t / 10))
        out.loss.backward()
        for group in est.param_groups():  # a plain SGD step on the estimator's own encoder-block params
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-1e-3)
                p.grad = None
        est.after_optimizer_step()
        outs.append((out.loss.detach(), xs.grad, ys.grad))
    return outs


@pytest.mark.parametrize("method", method_names())
def test_state_dict_round_trip_is_bit_exact(method):
    gen = torch.Generator().manual_seed(9)
    batches = []
    for _ in range(5):
        x = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=1)
        y = torch.nn.functional.normalize(x + 0.5 * torch.randn(12, 8, generator=gen), dim=1)
        batches.append((x, y, torch.randperm(40, generator=gen)[:12]))
    cfg = {**opts(method), **({"restart_every": 3} if method == "neuclip" else {})}
    a = build_estimator(method, cfg, small_ctx(n=40))
    run_steps(a, batches[:2], 0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build_estimator(method, cfg, small_ctx(n=40))
    b.load_state_dict(torch.load(buf, weights_only=True))
    for (la, xa, ya), (lb, xb, yb) in zip(run_steps(a, batches[2:], 2), run_steps(b, batches[2:], 2)):
        assert torch.equal(la, lb) and torch.equal(xa, xb) and torch.equal(ya, yb)
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        if torch.is_tensor(sa[key]):
            assert torch.equal(sa[key].nan_to_num(), sb[key].nan_to_num()), key


def test_neuclip_simultaneous_updates_detach_the_npn_inputs():
    """`updates: simultaneous` backpropagates once into encoders and NPN, but the NPN sees detached embeddings
    (docs/method.md §4): for the same alpha the encoder gradient equals the alternating form's."""
    B, d, tau = 10, 6, 0.1
    gen = torch.Generator().manual_seed(11)
    e1, e2 = ref.correlated_pair(B, d, gen)
    cfg = {"tau_init": tau, "eps": EPS, "num_prototypes": 8, "restart_every": 0}
    alternating = build_estimator("neuclip", cfg, EstimatorContext(embed_dim=d)).double()
    alternating.cfg["inner_steps"] = 0  # no NPN step before alpha, as in the simultaneous form
    simultaneous = build_estimator("neuclip", {**cfg, "updates": "simultaneous"}, EstimatorContext(embed_dim=d))
    simultaneous = simultaneous.double()
    simultaneous.load_state_dict(alternating.state_dict())
    grads = []
    for est in (alternating, simultaneous):
        x, y = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
        est(Batch(x, y, torch.arange(B), 0, 0.0)).loss.backward()
        grads.append((x.grad, y.grad, est.tau.grad))
    for a, b in zip(*grads):
        close(b, a)
    assert simultaneous.npn.w1.grad is not None and simultaneous.npn.w1.grad.abs().sum() > 0
    assert alternating.npn.w1.grad is None
