"""AdamW groups (no decay on gains/biases/1-d, estimator groups as given) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from neuclip.train.optim import build_optimizer, lr_multiplier, set_lr

torch.set_num_threads(1)


def test_groups_exclude_gains_biases_and_take_estimator_groups_as_given():
    from neuclip.estimators.base import EstimatorContext
    from neuclip.estimators.registry import build_estimator
    from neuclip.export import create_model

    model, *_ = create_model("tiny-vit")
    model.logit_scale.requires_grad_(False)  # the trainer does this: the estimator owns tau
    est = build_estimator("fastclip", {"lr_tau": 2e-4}, EstimatorContext(embed_dim=32, data_size=10))
    opt = build_optimizer(model, est, {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6})
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay", "tau"}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [names[id(p)] for p in groups["decay"]["params"]]
    no_decay = [names[id(p)] for p in groups["no_decay"]["params"]]
    assert all(p.ndim >= 2 for p in groups["decay"]["params"]) and groups["decay"]["weight_decay"] == 0.1
    assert not any("bias" in n or ".ln" in n or n.startswith("ln_") for n in decay)
    assert "visual.class_embedding" in no_decay and groups["no_decay"]["weight_decay"] == 0.0
    assert "logit_scale" not in decay + no_decay
    assert groups["tau"]["base_lr"] == 2e-4 and groups["tau"]["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert len(decay) + len(no_decay) == sum(p.requires_grad for p in model.parameters())

    # the model's schedule scales the encoder groups; the temperature's step_thresh group takes only its factor
    set_lr(opt, 0.5, {"tau": 1 / 3})
    assert groups["decay"]["lr"] == pytest.approx(5e-4) and groups["tau"]["lr"] == pytest.approx(2e-4 / 3)
    est = build_estimator("fastclip", {"lr_tau": 2e-4, "tau_schedule": "model_cosine"},
                          EstimatorContext(embed_dim=32, data_size=10))
    opt = build_optimizer(model, est, {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6})
    set_lr(opt, 0.5, {"tau": 1 / 3})
    assert next(g for g in opt.param_groups if g["name"] == "tau")["lr"] == pytest.approx(2e-4 * 0.5 / 3)


def test_warmup_then_cosine_to_zero():
    total, warmup = 100, 10
    lrs = [lr_multiplier(s, warmup, total) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3
    assert lr_multiplier(5, 0, 11) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 11)))
