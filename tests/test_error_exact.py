"""The exact streaming normaliser against brute force in float64, and independence from chunking."""

from __future__ import annotations

import math

import pytest
import torch

import tests.reference as ref
from neuclip.error_study.estimates import error_metrics, minibatch_log_normalizers
from neuclip.error_study.exact import exact_log_normalizers


@pytest.mark.parametrize("n,d,tau", [(9, 4, 0.1), (40, 8, 0.07), (33, 16, 0.2)])
def test_exact_equals_brute_force_float64(n, d, tau):
    gen = torch.Generator().manual_seed(n)
    e1, e2 = ref.correlated_pair(n, d, gen)
    a1, a2 = exact_log_normalizers(e1, e2, tau, 1e-8, chunk=7, anchor_block=5)
    torch.testing.assert_close(a1, torch.log(1e-8 + ref.g_hat(e1, e2, tau)), rtol=1e-12, atol=0)
    torch.testing.assert_close(a2, torch.log(1e-8 + ref.g_hat(e2, e1, tau)), rtol=1e-12, atol=0)


def test_chunking_and_anchor_subsets_do_not_change_results():
    gen = torch.Generator().manual_seed(0)
    e1, e2 = (x.float() for x in ref.correlated_pair(3000, 32, gen))
    anchors = torch.randperm(3000, generator=gen)[:257]
    base = exact_log_normalizers(
        e1, e2, 0.05, 1e-14, anchors=anchors, chunk=3000, anchor_block=257, accumulate="float64"
    )
    for chunk, block, acc in [(64, 16, "float32"), (1000, 100, "float64"), (2999, 1, "float32")]:
        out = exact_log_normalizers(
            e1, e2, 0.05, 1e-14, anchors=anchors, chunk=chunk, anchor_block=block, accumulate=acc
        )
        for got, want in zip(out, base):
            rel = ((got.double() - want) / want.abs()).abs().max()
            assert rel <= 1e-6, (chunk, block, acc, float(rel))


@pytest.mark.parametrize(
    ("dtype", "tau", "rtol", "atol"), [(torch.float64, 0.1, 1e-12, 0), (torch.float32, 0.01, 0, 1e-4)]
)
def test_chunk_holding_only_the_positive_pair(dtype, tau, rtol, atol):
    # chunk = 1: for each anchor one chunk holds nothing but its own (masked) column, an all -inf row; float64
    # at tau 0.1 takes the direct-sum path, float32 at tau 0.01 the running log-sum-exp (float32 rounding of
    # s_ij, ~1e-7, is magnified by 1/tau = 100 in log space: hence 1e-4 there)
    gen = torch.Generator().manual_seed(1)
    e1, e2 = ref.correlated_pair(40, 8, gen)
    a1, a2 = exact_log_normalizers(e1.to(dtype), e2.to(dtype), tau, 1e-8, chunk=1, anchor_block=7, accumulate="float64")
    torch.testing.assert_close(a1, torch.log(1e-8 + ref.g_hat(e1, e2, tau)), rtol=rtol, atol=atol)
    torch.testing.assert_close(a2, torch.log(1e-8 + ref.g_hat(e2, e1, tau)), rtol=rtol, atol=atol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_direct_sum_and_log_sum_exp_paths_agree(dtype, tol):
    # the fast path (direct sum, taken when no term can overflow) against the always-safe running log-sum-exp
    from neuclip.error_study.exact import _block, _block_direct

    gen = torch.Generator().manual_seed(2)
    e1, e2 = (x.to(dtype) for x in ref.correlated_pair(500, 16, gen))
    idx = torch.arange(0, 500, 7)
    pos = (e1[idx] * e2[idx]).sum(1)
    for tau in (0.03, 0.1, 0.5):
        safe = _block(e1[idx], e2, idx, pos, tau, 64, torch.float64)
        fast = _block_direct(e1[idx], e2, idx, pos, tau, 64, torch.float64)
        # log-space values, some near 0: absolute tolerance = relative error of the normaliser itself
        torch.testing.assert_close(fast, safe, rtol=tol, atol=tol)


def test_no_overflow_at_small_temperature():
    x = torch.nn.functional.normalize(torch.randn(100, 8), dim=1)
    a1, a2 = exact_log_normalizers(x, -x, 0.01, 1e-14)  # h up to 200
    assert torch.isfinite(a1).all() and torch.isfinite(a2).all() and a1.max() > 150


def test_minibatch_error_falls_as_batch_grows():
    gen = torch.Generator().manual_seed(1)
    e1, e2 = ref.correlated_pair(4096, 16, gen, noise=0.8)
    e1, e2 = e1.float(), e2.float()
    anchors = torch.arange(0, 4096, 4)
    exact = exact_log_normalizers(e1, e2, 0.1, 1e-14, anchors=anchors)
    errors = []
    for batch in (8, 64, 512):
        est = minibatch_log_normalizers(e1, e2, 0.1, 1e-14, batch, anchors, torch.Generator().manual_seed(2))
        errors.append(error_metrics(est[0], exact[0])["mse_log"])
    assert errors[0] > 2 * errors[1] > 4 * errors[2], errors


def test_error_metrics_ignore_missing_estimates():
    m = error_metrics(torch.tensor([math.nan, 1.0, 2.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert m["mse_log"] == pytest.approx(0.5) and m["coverage"] == pytest.approx(2 / 3)
    assert m["mean_rel_err"] == pytest.approx((math.e - 1) / 2)
