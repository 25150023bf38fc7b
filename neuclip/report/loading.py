"""Find and read what the other stages left under a runs root.

A training run folder is recognised by `done.json`; an error-study folder by `errors.csv` + `stress.csv`.
Each run becomes one flat record (`Run`): where it is, what it is (data set, scale, method label, variant,
seed, from `config.yaml`'s `meta` block with fall-backs to the plain config), where it came from
(`provenance.json`, config hash) and what it scored (group averages and task values of every
`eval/<suite>/summary.json`, as fractions).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from neuclip.yamlio import yaml_load


def _method_registry():
    from neuclip.estimators import registry

    return registry


# Labels and row order come from the estimator classes (neuclip/estimators/registry.py): nothing here lists
# methods, so a new estimator appears in every table by itself.
METHOD_LABELS = _method_registry().labels()
METHOD_ORDER = _method_registry().label_order()  # row order of every method table
def _dataset_labels() -> dict[str, str]:
    """dataset key -> label, in registry order, from workflows/datasets.yaml (the one list of data sets)."""
    from neuclip.grid.workflow import registry

    return {dataset_key(name): entry.get("label", name) for name, entry in registry({}).items()}


SCALES = ("paper", "small", "rehearsal", "tiny")  # column order; anything else sorts last and is never "paper"
GROUPS = ("datacomp38", "imagenet_variants", "retrieval", "tiny")


def method_label(name: str, options: dict | None) -> str:
    """Registry name + options -> the label tables use (FastCLIP-vN; FastCLIP-v2 is iSogCLR with a cosine
    gamma schedule): the estimator class decides."""
    try:
        return _method_registry().estimator_class(name).label_for(options or {})
    except KeyError:
        return name


def canonical_method(text: str) -> str:
    """A label or registry name as written by a person ("fastclip", "FastCLIP-v1", "neuclip") -> label."""
    by_lower = {m.lower(): m for m in METHOD_ORDER} | {"fastclip": "FastCLIP-v3"}
    return by_lower.get(str(text).lower(), METHOD_LABELS.get(str(text).lower(), str(text)))


def method_name(label: str) -> str:
    """Report label -> registry name (FastCLIP-v2 is isogclr)."""
    if label == "FastCLIP-v2":
        return "isogclr"
    return {v: k for k, v in METHOD_LABELS.items()}.get(label, label.lower().split("-")[0])


def dataset_key(name: str) -> str:
    """"DFN-14M", "dfn14m", "dfn_14m" -> "dfn14m"."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


DATASET_LABELS = _dataset_labels()
DATASET_ORDER = list(DATASET_LABELS)  # column order: workflows/datasets.yaml's


def dataset_label(key: str) -> str:
    return DATASET_LABELS.get(key, key)


def sort_key_method(label: str):
    return (METHOD_ORDER.index(label), label) if label in METHOD_ORDER else (len(METHOD_ORDER), label)


def sort_key_column(col: tuple[str, str]):
    ds, scale = col
    return (
        SCALES.index(scale) if scale in SCALES else len(SCALES),
        DATASET_ORDER.index(ds) if ds in DATASET_ORDER else len(DATASET_ORDER),
        ds,
        scale,
    )


@dataclass
class Run:
    path: str  # relative to the runs root, posix
    abspath: Path
    experiment: str
    dataset: str  # canonical key
    scale: str
    method: str  # label (FastCLIP-v1, ...)
    method_name: str  # registry name
    options: dict
    variant: str
    seed: int | None
    config_hash: str
    git_commit: str | None
    git_dirty: bool | None
    packages: dict
    hostname: str | None
    command: object
    groups: dict = field(default_factory=dict)  # group -> fraction (non-null only)
    tasks: dict = field(default_factory=dict)  # task -> fraction
    sources: dict = field(default_factory=dict)  # group/task -> summary.json path (relative to root)
    suites: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def column(self) -> tuple[str, str]:
        return (self.dataset, self.scale)

    def provenance(self) -> dict:
        return {
            "run": self.path,
            "experiment": self.experiment,
            "dataset": self.dataset,
            "scale": self.scale,
            "method": self.method,
            "method_name": self.method_name,
            "method_options": self.options,
            "variant": self.variant,
            "seed": self.seed,
            "config_hash": self.config_hash,
            "git_commit": self.git_commit,
            "git_dirty": self.git_dirty,
            "packages": self.packages,
            "hostname": self.hostname,
            "eval_summaries": sorted(set(self.sources.values())),
        }


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path, warnings: list) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        warnings.append(f"{path}: unreadable ({err}); ignored")
        return {}


def _provenance(prov: dict) -> tuple:
    """Both the documented flat form and the trainer's nested one ({git: {commit, dirty}, versions, attempts})."""
    git = prov.get("git") or {}
    attempts = prov.get("attempts") or [{}]
    last = attempts[-1] if isinstance(attempts[-1], dict) else {}
    commit = prov.get("git_commit", git.get("commit"))
    dirty = prov.get("git_dirty", git.get("dirty"))
    packages = prov.get("packages") or prov.get("versions") or {}
    hostname = prov.get("hostname", last.get("hostname"))
    command = prov.get("command", last.get("command"))
    return commit, dirty, packages, hostname, command


def load_run(folder: Path, root: Path) -> Run:
    warnings: list[str] = []
    cfg_path = folder / "config.yaml"
    if cfg_path.exists():
        cfg = yaml_load(cfg_path.read_text()) or {}
    else:
        cfg = {}
        warnings.append(f"{folder}: done.json without config.yaml; data set/method unknown")
    meta = cfg.get("meta") or {}
    method = cfg.get("method") or {}
    name = method.get("name") or meta.get("method") or "unknown"
    options = method.get("options") or {}
    prov = _read_json(folder / "provenance.json", warnings) if (folder / "provenance.json").exists() else {}
    if not prov:
        warnings.append(f"{folder}: no provenance.json")
    commit, dirty, packages, hostname, command = _provenance(prov)
    seed = meta.get("seed", cfg.get("seed", prov.get("seed")))
    run = Run(
        path=folder.relative_to(root).as_posix(),
        abspath=folder,
        experiment=str(meta.get("experiment", "")),
        dataset=dataset_key(meta.get("dataset", "unknown")),
        scale=str(meta.get("scale", "unknown")),
        method=method_label(name, options),
        method_name=name,
        options=options,
        variant=str(meta.get("variant", "default")),
        seed=int(seed) if seed is not None else None,
        config_hash=prov.get("config_hash") or (sha256_file(cfg_path) if cfg_path.exists() else ""),
        git_commit=commit,
        git_dirty=dirty,
        packages=packages,
        hostname=hostname,
        command=command,
        warnings=warnings,
    )
    _load_evals(run, root)
    return run


def _load_evals(run: Run, root: Path) -> None:
    """Merge every eval/<suite>/summary.json. A group that several suites report (the datacomp38 suite also
    yields imagenet_variants and retrieval) is taken from the suite of the same name when there is one."""
    summaries = sorted((run.abspath / "eval").glob("*/summary.json"))
    for path in sorted(summaries, key=lambda p: p.parent.name):
        summary = _read_json(path, run.warnings)
        rel = path.relative_to(root).as_posix()
        suite = summary.get("suite", path.parent.name)
        run.suites.append(suite)
        for group, value in (summary.get("groups") or {}).items():
            own = suite == group
            if value is not None and (group not in run.groups or own):
                run.groups[group] = float(value)
                run.sources[group] = rel
        for task, entry in (summary.get("tasks") or {}).items():
            if isinstance(entry, dict) and entry.get("value") is not None and task not in run.tasks:
                run.tasks[task] = float(entry["value"])
                run.sources[task] = rel


def find_runs(root: Path) -> tuple[list[Run], list[str]]:
    """All finished runs below root, and the folders that look like unfinished runs."""
    runs = [load_run(p.parent, root) for p in sorted(root.rglob("done.json"))]
    done = {r.abspath for r in runs}
    unfinished = sorted(
        p.parent.relative_to(root).as_posix()
        for p in root.rglob("config.yaml")
        if p.parent not in done and ((p.parent / "metrics.jsonl").exists() or (p.parent / "checkpoints").exists())
    )
    return runs, unfinished


@dataclass
class Study:
    path: str  # relative to the runs root ("." for the root itself)
    abspath: Path

    @property
    def slug(self) -> str:
        return "root" if self.path == "." else re.sub(r"[^A-Za-z0-9_.-]+", "-", self.path)


def find_studies(root: Path) -> list[Study]:
    return [
        Study(p.parent.relative_to(root).as_posix(), p.parent)
        for p in sorted(root.rglob("errors.csv"))
        if (p.parent / "stress.csv").exists()
    ]


def read_metrics(run: Run, name: str = "metrics.jsonl") -> list[dict]:
    """The JSON lines of a run's metrics.jsonl (or error_curve.jsonl); bad lines are skipped with a warning."""
    path = run.abspath / name
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                run.warnings.append(f"{path}: skipped a line that is not JSON")
    return rows


def error_curves(runs: list[Run]) -> pd.DataFrame:
    """Every default run's in-training normaliser error (error_curve.jsonl, `error.every`), one row per point."""
    frames = [
        pd.DataFrame(rows).assign(
            dataset=r.dataset, scale=r.scale, method=r.method_name, label=r.method, seed=r.seed, run=r.path
        )
        for r in runs
        if r.variant == "default" and (rows := read_metrics(r, "error_curve.jsonl"))
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
