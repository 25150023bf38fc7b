"""A sweep of shadow runs over (n, B), seeds and training budgets, its tables, fits and plots (docs/method.md §6.4).

Config (YAML), every key but `grid` optional:

    grid: {n: [640, 6400, 64000], batch_size: [32, 64]}   # or {ratio: [10, 100, ...], batch_size: [...]}: n = ratio B
    seeds: [0, 1]
    steps: 2000                 # budget (a): the same number of steps for every (n, B); null = no step budget
    measure_at: [500, 1000, 2000]   # measurement points of the step budget (default: its last step)
    epochs:                     # budget (b): whole epochs, measured at the end; each up to an optional n/B
      - {epochs: 1}
      - {epochs: 3, max_ratio: 3200}
    markers: workflows/configs/paper.yaml   # mark that grid's data sets' n/B (fit.paper_markers); null = none
    jobs: 2                     # parallel processes (one torch thread each)
    run: {tau: 0.07, anchors: 2048, shadows: {...}, ...}   # any ShadowRun field

With neither `steps` nor `epochs`, the step budget is 1000 steps. Runs that two budgets share (the same n, B,
seed and number of steps: e.g. 2000 steps and 1 epoch at n/B = 2000) run once: measuring never moves the
trajectory (shadow.py), so one run serves both.

Outputs in OUT: errors.csv / errors.json (one row per budget, method, n, B, seed, measured step; `visited` =
the fraction of anchors the training order has reached, `coverage` = the fraction the method has an estimate
for), fits.csv (fit.py), extrapolated.csv (the fitted laws at the markers), summary.md, timings.csv (seconds
per run), stress.csv / stress.md (the paper's two stress tests in miniature, at the step budget), and the
plots error_vs_ratio.{png,pdf} and error_over_steps.{png,pdf}.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from neuclip.atomic import write_atomic, write_json
from neuclip.error_study import fit
from neuclip.error_study.fit import final_points
from neuclip.error_study.plots import plot_error_over_steps, plot_error_vs_ratio
from neuclip.error_study.shadow import ShadowRun, run
from neuclip.yamlio import load_block

SWEEP_KEYS = {"grid", "seeds", "steps", "measure_at", "epochs", "markers", "jobs", "run"}
DEFAULT_STEPS = 1000
# docs/method.md §6: OpenCLIP / FastCLIP / NeuCLIP; the sources disagree on which stress test each row belongs to.
PAPER_STRESS = {"openclip": (8.2, 12.8), "fastclip": (6.2, 9.4), "neuclip": (0.7, 1.9)}
ORDER = ["budget", "method", "batch_size", "n", "seed", "step"]


def load_config(path: str | os.PathLike) -> dict:
    """A sweep config, or an experiment config (workflows/configs/error_study*.yaml): its `error_study` block."""
    cfg, where = load_block(path, "error_study")
    check_config(cfg, where)
    return cfg


def check_config(cfg: dict, where: str = "sweep config") -> None:
    unknown = set(cfg) - SWEEP_KEYS
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    grid = cfg.get("grid") or {}
    if "batch_size" not in grid or len({"n", "ratio"} & set(grid)) != 1 or set(grid) - {"n", "ratio", "batch_size"}:
        raise KeyError(
            f"{where}: needs grid: {{n: [...], batch_size: [...]}} or grid: {{ratio: [...], batch_size: [...]}}"
        )
    fields = set(ShadowRun.__dataclass_fields__)
    bad = set(cfg.get("run") or {}) - fields
    if bad:
        raise KeyError(f"{where}: unknown run option(s) {sorted(bad)}; allowed: {sorted(fields)}")
    for i, e in enumerate(cfg.get("epochs") or []):
        if not isinstance(e, dict) or set(e) - {"epochs", "max_ratio"} or not isinstance(e.get("epochs"), int) \
                or e["epochs"] < 1:
            raise KeyError(f"{where}: epochs[{i}] = {e!r}; write {{epochs: E (integer >= 1), max_ratio: R (optional)}}")


def step_label(steps: int) -> str:
    return f"{steps} steps"


def epoch_label(epochs: int) -> str:
    return f"{epochs} epoch" + ("" if epochs == 1 else "s")


def budgets(cfg: dict) -> list[str]:
    """Budget labels in config order (the step budget first)."""
    steps = _step_budget(cfg)
    return ([step_label(steps)] if steps else []) + [epoch_label(e["epochs"]) for e in cfg.get("epochs") or []]


def _step_budget(cfg: dict) -> int | None:
    if "steps" in cfg:
        return int(cfg["steps"]) if cfg["steps"] else None
    return None if cfg.get("epochs") else DEFAULT_STEPS


def plan(cfg: dict) -> list[dict]:
    """The runs of a sweep: ShadowRun fields plus `budgets` {label: [measured steps]}; shared runs merged."""
    grid, steps = cfg["grid"], _step_budget(cfg)
    cells = (
        [(int(r * b), b) for r in grid["ratio"] for b in grid["batch_size"]]
        if "ratio" in grid
        else [(n, b) for n in grid["n"] for b in grid["batch_size"]]
    )
    jobs: dict[tuple, dict] = {}

    def add(n, b, seed, length, label, measured):
        key = (n, b, seed, length)
        job = jobs.setdefault(key, {**(cfg.get("run") or {}), "n": n, "batch_size": b, "seed": seed,
                                    "steps": length, "budgets": {}})
        job["budgets"][label] = sorted(set(measured))

    for (n, b), seed in itertools.product(cells, cfg.get("seeds", [0])):
        if n < 2 * b:
            continue
        if steps:
            add(n, b, seed, steps, step_label(steps), cfg.get("measure_at") or [steps])
        for e in cfg.get("epochs") or []:
            if e.get("max_ratio") is None or n / b <= e["max_ratio"]:
                length = e["epochs"] * (n // b)
                add(n, b, seed, length, epoch_label(e["epochs"]), [length])
    out = []
    for job in jobs.values():
        job["measure_at"] = sorted({s for m in job["budgets"].values() for s in m})
        out.append(job)
    # Longest runs first (steps dominate; then the measurement's n), so the pool's tail is short.
    return sorted(out, key=lambda j: (-j["steps"], -j["n"]))


def plan_summary(jobs: list[dict]) -> pd.DataFrame:
    """Runs, training steps and measured rows (and row x anchor pairs of the exact pass), what sets the time,
    per budget (a run two budgets share is listed once, under both names joined by +)."""
    rows = []
    for j in jobs:
        measures = len(j["measure_at"])
        anchors = min(int(j.get("anchors", ShadowRun.anchors)), j["n"])
        rows.append({"budget": " + ".join(j["budgets"]), "runs": 1, "steps": j["steps"],
                     "measured_rows": j["n"] * measures, "row_anchors": j["n"] * anchors * measures,
                     "max_ratio": j["n"] / j["batch_size"]})
    return pd.DataFrame(rows).groupby("budget", sort=False).agg(
        runs=("runs", "sum"), steps=("steps", "sum"), measured_rows=("measured_rows", "sum"),
        row_anchors=("row_anchors", "sum"), max_ratio=("max_ratio", "max"))


def estimate_wall_seconds(jobs: list[dict], step_ms: float, row_us: float, row_anchor_ns: float,
                          workers: int) -> float:
    """The sweep's wall time from measured unit costs: `step_ms` per training step, `row_us` per row embedded
    (features + encoder) and `row_anchor_ns` per (row, anchor) of the exact pass, with the jobs handed to
    `workers` processes in plan order as each frees up (what ProcessPoolExecutor.map does). Shared runs count
    once."""
    free = [0.0] * max(1, workers)
    for j in jobs:
        anchors = min(int(j.get("anchors", ShadowRun.anchors)), j["n"])
        per_row = row_us / 1e6 + anchors * row_anchor_ns / 1e9
        cost = j["steps"] * step_ms / 1e3 + len(j["measure_at"]) * j["n"] * per_row
        free[free.index(min(free))] += cost
    return max(free)


def _one(job: dict) -> tuple[list[dict], dict]:
    import torch

    torch.set_num_threads(1)
    fields = {k: v for k, v in job.items() if k != "budgets"}
    timings: dict = {}
    rows = run(ShadowRun(**fields), progress=lambda msg: print(msg, flush=True), timings=timings)
    labelled = [
        {"budget": label, **row}
        for label, measured in job["budgets"].items()
        for row in rows
        if row["step"] in measured
    ]
    return labelled, {"n": job["n"], "batch_size": job["batch_size"], "seed": job["seed"], **timings}


def run_sweep(cfg: dict, out_dir: str | os.PathLike) -> pd.DataFrame:
    check_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(cfg)
    workers = int(cfg.get("jobs", 1))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_one, jobs))
    else:
        results = [_one(j) for j in jobs]
    rows = [r for rs, _ in results for r in rs]
    frame = sort_frame(pd.DataFrame(rows), budgets(cfg))
    write_outputs(frame, cfg, out)
    timings = pd.DataFrame([t for _, t in results])
    timings["ms_per_step"] = 1e3 * timings["train_s"] / timings["steps"]
    timings["cpu_ms_per_step"] = 1e3 * timings["train_cpu_s"] / timings["steps"]
    write_atomic(out / "timings.csv", timings.to_csv(index=False, float_format="%.4g"))
    return frame


def sort_frame(frame: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    frame = frame.copy()
    frame["budget"] = pd.Categorical(frame["budget"], categories=order, ordered=True)
    frame = frame.sort_values(ORDER).reset_index(drop=True)
    frame["budget"] = frame["budget"].astype(str)
    return frame


def write_outputs(frame: pd.DataFrame, cfg: dict, out: Path) -> None:
    """Every table and plot from the rows (also usable on a saved errors.csv)."""
    markers = fit.paper_markers(cfg["markers"]) if cfg.get("markers") else []
    write_atomic(out / "errors.csv", frame.to_csv(index=False))
    write_json(out / "errors.json", {"config": cfg, "rows": frame.to_dict("records")})
    fits = fit.fit_table(frame)
    write_atomic(out / "fits.csv", fits.to_csv(index=False, float_format="%.6g"))
    extra = fit.extrapolate(frame, fits, markers) if len(fits) and markers else pd.DataFrame()
    write_atomic(out / "extrapolated.csv", extra.to_csv(index=False, float_format="%.6g"))
    write_atomic(out / "summary.md", summary(frame, fits, extra, markers))
    stress = stress_table(frame)
    write_atomic(out / "stress.csv", stress.to_csv(index=False))
    write_atomic(out / "stress.md", stress.to_markdown(index=False, floatfmt=".3g") + "\n")
    plot_error_vs_ratio(frame, out / "error_vs_ratio", markers=markers, fits=fits)
    plot_error_over_steps(frame, out / "error_over_steps")


def summary(frame: pd.DataFrame, fits: pd.DataFrame, extra: pd.DataFrame, markers: list[dict]) -> str:
    """Markdown tables: final-step error per budget (mean over seeds) with the anchors visited; the fits; the
    fitted laws at the paper data sets' n/B."""
    last = final_points(frame)
    parts = ["# Shadow sweep: final-step log-space MSE (mean over seeds)\n"]
    for budget, part in last.groupby("budget", sort=False):
        table = part.pivot_table(index=["batch_size", "n_over_b"], columns="method", values="mse_log", aggfunc="mean")
        table.insert(0, "visited", part.groupby(["batch_size", "n_over_b"])["visited"].mean())
        parts.append(f"## {budget}\n\n{table.reset_index().to_markdown(index=False, floatfmt='.3g')}\n")
    if len(fits):
        cols = ["budget", "method", "batch_size", "k", "k_lo", "k_hi", "k_per_seed", "ratio_min", "ratio_max", "seeds"]
        parts.append("## Fits: mse_log = c (n/B)^k over the points with visited = 1 (95% t-interval over seeds)\n\n"
                     + fits[cols].to_markdown(index=False, floatfmt=".3g") + "\n")
    if len(extra):
        wide = extra.pivot_table(index=["budget", "batch_size", "method"], columns="dataset", values="mse_log_fit",
                                 sort=False)
        wide = wide[[m["dataset"] for m in sorted(markers, key=lambda m: m["n_over_b"])]]  # columns by n/B
        names = ", ".join(f"{m['label']} {m['n_over_b']:.3g}" for m in markers)
        parts.append(f"## Fitted law at each paper data set's n/B ({names})\n\n"
                     + wide.reset_index().to_markdown(index=False, floatfmt=".3g") + "\n")
    return "\n".join(parts)


def stress_table(frame: pd.DataFrame, metric: str = "mse_log") -> pd.DataFrame:
    """Error growth under the paper's two stresses, at the final step, mean over seeds, for one budget (the
    step budget when there is one: at fixed steps; otherwise the first budget).

    batch halved: err(n, B/2) / err(n, B) for every n where both B and B/2 ran;
    data x10:     err(10 n, B) / err(n, B) for every B where both n and 10 n ran.
    """
    last = frame[frame["step"] == frame["steps"]]
    budget = None
    if "budget" in last:
        names = list(dict.fromkeys(last["budget"]))
        budget = next((b for b in names if b.endswith(" steps")), names[0])
        last = last[last["budget"] == budget]
    mean = last.groupby(["method", "n", "batch_size"])[metric].mean()
    rows = []
    for method in sorted(last["method"].unique()):
        m = mean.loc[method]
        halved = [m[(n, b // 2)] / m[(n, b)] for (n, b) in m.index if (n, b // 2) in m.index and b % 2 == 0]
        tenfold = [m[(10 * n, b)] / m[(n, b)] for (n, b) in m.index if (10 * n, b) in m.index]
        paper = PAPER_STRESS.get(method, (None, None))
        rows.append(
            {
                "method": method,
                "batch_halved_ratio": _mean(halved),
                "data_x10_ratio": _mean(tenfold),
                "pairs_halved": len(halved),
                "pairs_x10": len(tenfold),
                "paper_row1": paper[0],
                "paper_row2": paper[1],
                "scale": "small CPU (synthetic features)" + (f", {budget}" if budget else ""),
            }
        )
    return pd.DataFrame(rows)


def _mean(values):
    return sum(values) / len(values) if values else float("nan")

