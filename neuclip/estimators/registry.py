"""Registry: method name -> estimator class, imported lazily so listing methods stays cheap."""

from __future__ import annotations

import importlib

from neuclip.estimators.base import Estimator, EstimatorContext

# name -> (module:Class, one-line description)
METHODS: dict[str, tuple[str, str]] = {
    "openclip": ("baselines.openclip:OpenCLIP", "mini-batch contrastive loss (open_clip ClipLoss), learnable tau"),
    "siglip": ("baselines.siglip:SigLIP", "pairwise sigmoid loss (open_clip SigLipLoss), no normaliser"),
    "sogclr": ("baselines.sogclr:SogCLR", "GCL with per-sample moving-average normalisers, constant gamma"),
    "isogclr": ("baselines.isogclr:ISogCLR", "RGCL: per-sample normalisers and per-sample temperatures"),
    "fastclip": ("baselines.fastclip:FastCLIP", "FastCLIP v0/v1/v3 (default v3: RGCL-g, cosine gamma)"),
    "amorlip": ("baselines.amorlip:AmorLIP", "amortised normalisers: lambda-MLP regressed on EMA targets"),
    "neuclip": ("neuclip.neuclip:NeuCLIP", "NeuCLIP: prototype normaliser-prediction network, unified objective"),
}


def method_names() -> list[str]:
    return list(METHODS)


def estimator_class(name: str) -> type[Estimator]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    module_name, cls_name = METHODS[name][0].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_estimator(name: str, cfg: dict | None, ctx: EstimatorContext, common: dict | None = None) -> Estimator:
    """Build `name` with options `cfg`; an unknown option is an error that lists the known ones.

    `common` holds knobs shared across methods (rho, lr_tau, gamma_min, ...): each is applied only where the
    method has it, so one experiment config can set them once for every method; `cfg` wins over `common`.
    """
    cls = estimator_class(name)
    cfg = dict(cfg or {})
    defaults = getattr(cls, "defaults", {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise KeyError(
            f"method {name!r}: unknown option(s) {unknown}; known options: {', '.join(sorted(defaults))}"
        )
    shared = {k: v for k, v in (common or {}).items() if k in defaults}
    return cls({**defaults, **shared, **cfg}, ctx)
