"""The driver study (`neuclip study drivers CONFIG --out DIR`): every method trains its own runs on the
synthetic paired features over a grid of n/B, global batch B, seeds and budgets, with its temperature learned
as it ships and, at one n/B, fixed at several values (so the temperature's effect and the estimator's can be
told apart). Each run is neuclip/study/driver_run.py.

Config (YAML; an experiment config's `drivers:` block, or the block alone):

    methods: [openclip, siglip, sogclr, isogclr, fastclip, amorlip, neuclip]   # default: every method
    seeds: [0, 1, 2]
    batch_size: [32, 64, 128, 256]
    ratio: [10, 100, 1000, 10000]      # n/B; n = ratio x B
    epochs: 1                          # budget: whole epochs (null: none)
    steps: 1000                        # budget: the same number of steps at every point (null: none)
    fixed_tau: {values: [0.07, 0.03, 0.015], ratio: 100}   # at the step budget, every B
    options: {neuclip: {num_prototypes: 256}}              # declared per-method settings (never tuned on seeds)
    run: {lr: 2.0e-3, warmup_steps: 50, heldout: 1024, anchors: 1024, ...}   # any DriverRun field
    jobs: 2

One rule sets every method's settings: its shipped defaults, `options` where declared, and rho from the data
set's rule (neuclip/estimators/rho.py, rho_for(n, B)) for every method that takes rho; `options` may not set
rho. Runs that two budgets share (1 epoch at n/B = 1000 = 1000 steps) run once.

Outputs in OUT: runs.jsonl (one line per finished run, appended as runs finish; a rerun skips the runs there
whose every setting is the same, `run_key`),
runs.csv, learned.md / fixed_tau.md (mean over seeds with a 95 % t-interval), claims.md (the paper's ordering
checked at the grid's small B and large n/B), accuracy_vs_ratio.{png,pdf}, accuracy_vs_batch.{png,pdf}.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from neuclip.atomic import write_atomic
from neuclip.estimators.registry import estimator_class, method_names
from neuclip.estimators.rho import rho_for
from neuclip.study.driver_run import DriverRun, run
from neuclip.study.plots import plot_accuracy
from neuclip.yamlio import load_block

KEYS = {"methods", "seeds", "batch_size", "ratio", "epochs", "steps", "fixed_tau", "options", "run", "jobs"}


def load_config(path: str | os.PathLike) -> dict:
    cfg, where = load_block(path, "drivers")
    check_config(cfg, where)
    return cfg


def check_config(cfg: dict, where: str = "drivers config") -> None:
    unknown = set(cfg) - KEYS
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(KEYS)}")
    for key in ("batch_size", "ratio"):
        if not cfg.get(key):
            raise KeyError(f"{where}: needs {key}: [...]")
    known = set(method_names())
    for m in cfg.get("methods") or []:
        if m not in known:
            raise KeyError(f"{where}: methods: unknown method {m!r}; known: {sorted(known)}")
    for m, opts in (cfg.get("options") or {}).items():
        if m not in known:
            raise KeyError(f"{where}: options: unknown method {m!r}")
        if "rho" in (opts or {}):
            raise KeyError(f"{where}: options.{m}.rho: rho comes from the data set's rule (rho_for), not a setting")
    bad = set(cfg.get("run") or {}) - set(DriverRun.__dataclass_fields__)
    if bad:
        allowed = sorted(DriverRun.__dataclass_fields__)
        raise KeyError(f"{where}: run: unknown option(s) {sorted(bad)}; allowed: {allowed}")
    fixed = cfg.get("fixed_tau") or {}
    if fixed and (set(fixed) != {"values", "ratio"} or not cfg.get("steps")):
        raise KeyError(f"{where}: fixed_tau needs {{values: [...], ratio: R}} and a step budget (steps)")


def options_for(cfg: dict, method: str, n: int, batch: int) -> dict:
    """The one rule: the method's defaults, its declared options, and the data set's rho where it takes one."""
    options = dict((cfg.get("options") or {}).get(method) or {})
    if "rho" in estimator_class(method).defaults:
        options["rho"] = rho_for(n, batch)
    return options


def plan(cfg: dict) -> list[dict]:
    """Every run of the study as {'run': DriverRun fields, 'budgets': [labels]}; shared runs merged."""
    methods = cfg.get("methods") or method_names()
    base = dict(cfg.get("run") or {})
    runs: dict[tuple, dict] = {}

    def add(method, n, b, steps, seed, fixed, label):
        key = (method, n, b, steps, seed, fixed)
        entry = runs.setdefault(key, {"run": {**base, "method": method, "n": n, "batch_size": b, "steps": steps,
                                              "seed": seed, "fixed_tau": fixed,
                                              "options": options_for(cfg, method, n, b)}, "budgets": []})
        entry["budgets"].append(label)

    for method, b, r, seed in itertools.product(methods, cfg["batch_size"], cfg["ratio"], cfg.get("seeds", [0])):
        n = int(r * b)
        if cfg.get("epochs"):
            add(method, n, b, int(cfg["epochs"]) * (n // b), seed, None, f"{cfg['epochs']} epoch")
        if cfg.get("steps"):
            add(method, n, b, int(cfg["steps"]), seed, None, f"{cfg['steps']} steps")
    fixed = cfg.get("fixed_tau") or {}
    for method, b, tau, seed in itertools.product(methods, cfg["batch_size"], fixed.get("values", []),
                                                  cfg.get("seeds", [0])):
        n = int(fixed["ratio"] * b)
        add(method, n, b, int(cfg["steps"]), seed, float(tau), f"{cfg['steps']} steps")
    return sorted(runs.values(), key=lambda e: -e["run"]["steps"] * e["run"]["batch_size"])


def _run_key(run: dict) -> str:
    """A run's identity: a hash of every DriverRun field (options included), so a changed setting reruns it."""
    fields = {**asdict(DriverRun(method="", n=0, batch_size=0, steps=0)), **run}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _one(fields: dict) -> dict:
    import torch


    torch.set_num_threads(1)
    return {"run_key": _run_key(fields), **run(DriverRun(**fields))}


def run_study(cfg: dict, out: str | os.PathLike, jobs: int | None = None, progress=print) -> pd.DataFrame:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["run_key"]] = row
    entries = plan(cfg)
    budgets = {_run_key(e["run"]): e["budgets"] for e in entries}
    todo = [e for e in entries if _run_key(e["run"]) not in done]
    progress(f"drivers: {len(todo)} runs to do, {len(done)} already in {log}")
    jobs = int(jobs or cfg.get("jobs") or 1)
    for i, row in enumerate(_results(todo, jobs), 1):
        with open(log, "a") as f:  # one line per run, appended whole: a crash keeps every finished run
            f.write(json.dumps(row) + "\n")
        done[row["run_key"]] = row
        progress(f"drivers: {i}/{len(todo)} {row['method']} n={row['n']} B={row['batch_size']} "
                 f"steps={row['steps']} seed={row['seed']} {row['tau_mode']}: i2t {row['i2t_top1']:.3f}")
    rows = []
    for key, row in done.items():
        for label in budgets.get(key, []):
            rows.append({**row, "budget": label})
    frame = pd.DataFrame(rows)
    write_outputs(frame, out, cfg)
    return frame


def _results(todo: list[dict], jobs: int):
    """The runs' result rows as they finish: in this process (jobs 1) or a pool of `jobs` processes."""
    if jobs <= 1:
        for entry in todo:
            yield _one(dict(entry["run"]))
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(_one, dict(e["run"])) for e in todo]):
            yield future.result()


# -- tables, claims, plots ---------------------------------------------------------------------------------------
METRICS = ("i2t_top1", "t2i_top1", "zero_shot_top1", "final_tau", "mse_log")


def t_interval(values: pd.Series) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval over seeds (NaN with one seed)."""
    from scipy import stats

    values = values.dropna()
    k = len(values)
    if k == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if k < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.975, k - 1) * values.std(ddof=1) / math.sqrt(k))


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (budget, tau mode, B, n/B, method): mean and t-interval half-width of each metric."""
    groups = ["budget", "tau_mode", "batch_size", "n_over_b", "method"]
    rows = []
    for key, part in frame.groupby(groups, sort=True):
        row = dict(zip(groups, key)) | {"seeds": part["seed"].nunique(), "label": part["label"].iloc[0],
                                        "rho": part["rho"].iloc[0]}
        for metric in METRICS:
            row[metric], row[f"{metric}_ci"] = t_interval(part[metric])
        row["train_cpu_s"] = float(part["train_cpu_s"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, ci: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(ci) else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def markdown_table(table: pd.DataFrame, metric: str, digits: int = 3) -> str:
    """Methods as rows, (B, n/B) as columns."""
    cols = sorted({(int(b), r) for b, r in zip(table["batch_size"], table["n_over_b"])})
    labels = table.drop_duplicates("method").set_index("method")["label"]
    head = "| method | " + " | ".join(f"B {b}, n/B {r:g}" for b, r in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for method in _method_order(table["method"].unique()):
        part = table[table["method"] == method].set_index(["batch_size", "n_over_b"])
        cells = []
        for b, r in cols:
            if (b, r) in part.index:
                row = part.loc[(b, r)]
                cells.append(_cell(float(row[metric]), float(row[f"{metric}_ci"]), digits))
            else:
                cells.append("")
        lines.append(f"| {labels[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _method_order(methods) -> list[str]:
    order = {m: estimator_class(m).order for m in methods}
    return sorted(methods, key=lambda m: order[m])


def claims(table: pd.DataFrame) -> str:
    """The paper's claims, checked on the learned-tau rows of each budget: NeuCLIP >= FastCLIP >= OpenCLIP (mean
    i2t) at the smallest B and the largest n/B, and the NeuCLIP - FastCLIP gap growing with n/B."""
    lines = ["# The paper's claims on the driver study\n"]
    learned = table[table["tau_mode"] == "learned"]
    need = {"neuclip", "fastclip", "openclip"}
    if not need <= set(learned["method"]):
        return "\n".join(lines + [f"Needs {sorted(need)} among the methods; nothing checked.\n"])
    for budget, part in learned.groupby("budget"):
        b = int(part["batch_size"].min())
        at_b = part[part["batch_size"] == b]
        ratios = sorted(at_b["n_over_b"].unique())
        mean = at_b.set_index(["method", "n_over_b"])["i2t_top1"]
        big = ratios[-1]
        n, f, o = (float(mean[(m, big)]) for m in ("neuclip", "fastclip", "openclip"))
        gaps = [float(mean[("neuclip", r)] - mean[("fastclip", r)]) for r in ratios]
        lines += [f"## {budget}, B = {b}\n",
                  f"- at n/B = {big:g}: NeuCLIP {n:.3f}, FastCLIP-v3 {f:.3f}, OpenCLIP {o:.3f}: "
                  f"NeuCLIP >= FastCLIP: **{'holds' if n >= f else 'does not hold'}**; FastCLIP >= OpenCLIP: "
                  f"**{'holds' if f >= o else 'does not hold'}**",
                  "- NeuCLIP - FastCLIP-v3 (i2t) by n/B: " + ", ".join(f"{r:g}: {g:+.3f}" for r, g in zip(ratios, gaps))
                  + f"; growing with n/B: **{'yes' if all(a <= b for a, b in zip(gaps, gaps[1:])) else 'no'}**",
                  ""]
    return "\n".join(lines)


def write_outputs(frame: pd.DataFrame, out: Path, cfg: dict) -> None:
    if frame.empty:
        return
    flat = frame.drop(columns=["tau_path"], errors="ignore")
    write_atomic(out / "runs.csv", flat.sort_values(["budget", "tau_mode", "method", "batch_size", "n", "seed"])
                 .to_csv(index=False))
    table = summary(frame)
    write_atomic(out / "summary.csv", table.to_csv(index=False))
    parts = []
    for budget, part in table[table["tau_mode"] == "learned"].groupby("budget"):
        for metric, title in (("i2t_top1", "i2t top-1 (held-out pairs)"), ("zero_shot_top1", "zero-shot top-1"),
                              ("final_tau", "final tau"), ("mse_log", "MSE of the own log-normaliser estimate")):
            parts.append(f"## {budget}: {title}\n\n" + markdown_table(part, metric, 4 if metric == "final_tau" else 3))
    write_atomic(out / "learned.md", "# Learned temperature (each method as it ships; rho by rho_for(n, B))\n\n"
                 + "\n".join(parts))
    fixed = table[table["tau_mode"] != "learned"]
    if not fixed.empty:
        parts = []
        for mode, part in fixed.groupby("tau_mode"):
            parts.append(f"## tau {mode}: i2t top-1\n\n" + markdown_table(part, "i2t_top1"))
        write_atomic(out / "fixed_tau.md", "# Fixed temperature\n\n" + "\n".join(parts))
    write_atomic(out / "claims.md", claims(table))

    plot_accuracy(table, out)
