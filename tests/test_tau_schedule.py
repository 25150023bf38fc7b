"""The learned global temperature's lr over a whole run, against a plain re-implementation of the public
schedule (fast_clip's `step_lr_thresh(groups, lr_tau, 0, [0.03], [1/3], model)`, also AmorLIP's): lr_tau
constant, with no warmup and no decay, times 1/3 while 1 / logit_scale.exp() <= 0.03, checked as each step
begins. 1000 steps through the trainer's own Stepper and AdamW groups, tau crossing the threshold downwards and
then upwards (rho is lowered half way, a test lever to make tau rise again), and a resume from the state dicts
half way that continues bit for bit. FastCLIP learns tau itself, AmorLIP log(1/tau): both parameterisations.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from neuclip.estimators.base import EstimatorContext
from neuclip.estimators.registry import build_estimator
from neuclip.train.optim import build_optimizer, lr_multiplier
from neuclip.train.step import Stepper
from neuclip.train.testing import tensors_equal

torch.set_num_threads(1)
N, B, STEPS, WARMUP, THRESHOLD = 256, 16, 1000, 50, 0.03
# (method, lr_tau, rho before / after step RHO_SWITCH): tau falls below 0.03, then rises above it again
CASES = [("fastclip", 2e-3, 3.0, -2.0), ("amorlip", 2e-2, 3.0, -3.0)]
RHO_SWITCH = 500


def public_step_lr_thresh(lr_tau: float, tau: float) -> float:
    """fast_clip's step_lr_thresh for one group, warmup 0, thresholds [0.03], ratios [1/3]."""
    lr = lr_tau
    for thresh, ratio in zip([THRESHOLD], [1 / 3]):
        if tau <= thresh:
            lr = lr_tau * ratio
        else:
            break
    return lr


class PairEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.text = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x, y):
        return nn.functional.normalize(self.image(x), dim=-1), nn.functional.normalize(self.text(y), dim=-1)


def _data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=g)
    labels = torch.randint(0, 8, (N,), generator=g)
    x = centres[labels] + 0.5 * torch.randn(N, 16, generator=g)
    y = centres[labels] + 0.5 * torch.randn(N, 16, generator=g)
    batches = [torch.randperm(N, generator=g)[:B] for _ in range(STEPS)]
    return x, y, batches


def _build(method: str, lr_tau: float, rho: float, schedule: str):
    torch.manual_seed(0)
    model = PairEncoder()
    est = build_estimator(method, {"lr_tau": lr_tau, "rho": rho, "tau_schedule": schedule},
                          EstimatorContext(embed_dim=8, data_size=N))
    train = {"lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "grad_clip": None,
             "warmup_steps": WARMUP}
    opt = build_optimizer(model, est, train)
    stepper = Stepper(model, est, opt, cfg={"train": train, "data": {"data_size": N}}, world=1,
                      device=torch.device("cpu"), bf16=False, total_steps=STEPS, steps_per_epoch=N // B,
                      ckpt_dir=Path("unused"))
    return model, est, opt, stepper


def _run(method, lr_tau, rho, rho_after, schedule="step_thresh", resume_at=None):
    """(tau as each step begins, the tau group's lr that step, final state) over the whole run."""
    x, y, batches = _data()
    model, est, opt, stepper = _build(method, lr_tau, rho, schedule)
    taus, lrs = [], []
    for step in range(STEPS):
        if step == resume_at:  # a new process: everything from the state dicts
            saved = io.BytesIO()
            torch.save({"model": model.state_dict(), "est": est.state_dict(), "opt": opt.state_dict()}, saved)
            saved.seek(0)
            state = torch.load(saved, weights_only=False)
            model, est, opt, stepper = _build(method, lr_tau, rho, schedule)
            model.load_state_dict(state["model"])
            est.load_state_dict(state["est"])
            opt.load_state_dict(state["opt"])
        if step >= RHO_SWITCH:
            est.cfg["rho"] = rho_after
        taus.append(est.temperature())
        stepper(x[batches[step]], y[batches[step]], batches[step], step, lambda: False)
        lrs.append(next(g["lr"] for g in opt.param_groups if g["name"] == "tau"))
    return taus, lrs, copy.deepcopy(est.state_dict())


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def run(request):
    method, lr_tau, rho, rho_after = request.param
    return request.param, _run(method, lr_tau, rho, rho_after)


def test_tau_lr_is_the_public_step_thresh_at_every_step(run):
    (_, lr_tau, _, _), (taus, lrs, _) = run
    below = [t <= THRESHOLD for t in taus]
    down = [s for s in range(1, STEPS) if below[s] and not below[s - 1]]
    up = [s for s in range(1, STEPS) if below[s - 1] and not below[s]]
    assert down and up and min(up) > min(down), (taus[::50], down, up)  # crosses both ways
    assert lrs == [public_step_lr_thresh(lr_tau, t) for t in taus]
    assert lrs[0] == lr_tau  # no warmup


def test_a_resume_half_way_continues_the_schedule_bit_for_bit(run):
    (method, lr_tau, rho, rho_after), (taus, lrs, final) = run
    taus2, lrs2, final2 = _run(method, lr_tau, rho, rho_after, resume_at=STEPS // 2 + 7)
    assert taus2 == taus and lrs2 == lrs
    assert tensors_equal(final, final2) == []


def test_model_cosine_keeps_the_former_schedule():
    """The named former schedule: the model's warmup and cosine on lr_tau, / 3 for good once tau reached 0.03."""
    method, lr_tau, rho, rho_after = CASES[0]
    taus, lrs, _ = _run(method, lr_tau, rho, rho_after, schedule="model_cosine")
    reached = False
    expected = []
    for step in range(STEPS):
        reached = reached or (step > 0 and taus[step] <= THRESHOLD)  # the flag is set after a step's projection
        expected.append(lr_tau * lr_multiplier(step, WARMUP, STEPS) * (1 / 3 if reached else 1.0))
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert math.isclose(lrs[0], lr_tau / WARMUP)
