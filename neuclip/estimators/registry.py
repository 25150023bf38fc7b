"""Registry: every Estimator subclass found in the estimator modules, by its declared `name`.

Adding an estimator is adding one file: a module under `baselines/` (or `neuclip/neuclip.py` for the method
itself) defining an `Estimator` subclass with a `name`. Everything that lists methods derives from here: the
experiment schema's method enum, `neuclip methods`, the report's labels and row order, the error study's
scored set and default shadows, the plot colours. See "Adding an estimator" in docs/methods.md.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
import warnings

from neuclip.estimators.base import Estimator, EstimatorContext
from neuclip.estimators.options import OptionError, check

# Where estimator modules live: every module of these packages, plus these modules.
ESTIMATOR_PACKAGES = ("baselines",)
ESTIMATOR_MODULES = ("neuclip.neuclip",)
SCORED_KINDS = ("state", "minibatch")  # estimate kinds the error study can score (docs/method.md §6.3)
# A method's name, everywhere it appears (configs, the experiment schema, Snakemake's wildcards, run folders,
# job names): a lowercase identifier.
METHOD_NAME = r"[a-z][a-z0-9_]*"


@functools.cache
def _classes() -> dict[str, type[Estimator]]:
    modules = list(ESTIMATOR_MODULES)
    for package in ESTIMATOR_PACKAGES:
        pkg = importlib.import_module(package)
        modules += [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    found: dict[str, type[Estimator]] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Estimator) and obj.__module__ == module_name
                    and obj.__dict__.get("name")):
                if not re.fullmatch(METHOD_NAME, obj.name):
                    raise RuntimeError(f"{module_name}: estimator name {obj.name!r} must match {METHOD_NAME} (a "
                                       "lowercase identifier: it names run folders, wildcards and jobs)")
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two estimators are named {obj.name!r}: {found[obj.name]} and {obj}")
                found[obj.name] = obj
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


def method_names() -> list[str]:
    """Registered names in table order."""
    return list(_classes())


def estimator_class(name: str) -> type[Estimator]:
    classes = _classes()
    if name not in classes:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(classes)}")
    return classes[name]


def scored_methods() -> list[str]:
    """Methods whose normaliser estimate the error study scores."""
    return [n for n, c in _classes().items() if c.estimate_kind in SCORED_KINDS]


def default_shadows() -> dict[str, dict]:
    """The error-study sweep's default shadow estimators and their options."""
    return {n: dict(c.shadow) for n, c in _classes().items() if c.shadow is not None}


def labels() -> dict[str, str]:
    """name -> default report label."""
    return {n: c.label_for({}) for n, c in _classes().items()}


def label_order() -> list[str]:
    """Every label a run can carry, in table order."""
    return [label for c in _classes().values() for label in c.labels()]


def colours() -> dict[str, str]:
    return {n: c.colour for n, c in _classes().items() if c.colour}


def shared_option_keys() -> dict[str, list[str]]:
    """Keys an experiment's `common_options` may set -> the methods that take each."""
    out: dict[str, list[str]] = {}
    for name, cls in _classes().items():
        for key, opt in cls.options.items():
            if opt.shared:
                out.setdefault(key, []).append(name)
    return dict(sorted(out.items()))


def resolve_options(name: str, cfg: dict | None, common: dict | None = None) -> dict:
    """The full options of method `name`: defaults <- the shared keys of `common` it takes <- `cfg`.

    Raises OptionError naming the key for an unknown option, a common key no method takes (a typo would
    otherwise vanish), or a value of the wrong type or range.
    """
    cls = estimator_class(name)
    cfg, common = dict(cfg or {}), dict(common or {})
    shared = shared_option_keys()
    typos = sorted(set(common) - set(shared))
    if typos:
        raise OptionError(
            f"method.common_options: {typos} is not a shared option of any method; shared options: "
            + "; ".join(f"{k} ({', '.join(v)})" for k, v in shared.items())
        )
    check(name, cfg, cls.options)
    taken = {k: v for k, v in common.items() if name in shared[k]}
    check(name, taken, cls.options, where="method.common_options")
    return {**cls.defaults, **taken, **cfg}


def check_method(name: str, cfg: dict | None, common: dict | None, ctx: EstimatorContext,
                 global_batch: int) -> tuple[dict, list[str]]:
    """Everything `build_estimator` checks, without building it: (resolved options, warnings)."""
    options = resolve_options(name, cfg, common)
    return options, estimator_class(name).check_context(options, ctx, global_batch)


def build_estimator(name: str, cfg: dict | None, ctx: EstimatorContext, common: dict | None = None,
                    global_batch: int | None = None) -> Estimator:
    """Build `name` with options `cfg` over the shared knobs `common` (see `resolve_options`)."""
    options = resolve_options(name, cfg, common)
    if global_batch is not None:
        for message in estimator_class(name).check_context(options, ctx, global_batch):
            warnings.warn(f"method {name!r}: {message}", stacklevel=2)
    return estimator_class(name)(options, ctx)


__all__ = ["OptionError", "build_estimator", "check_method", "estimator_class", "method_names", "resolve_options"]
