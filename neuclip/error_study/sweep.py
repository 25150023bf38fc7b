"""A sweep of shadow runs over (n, B) and seeds, its tables and its plots (METHOD.md §6.4).

Config (YAML), every key but `grid` optional:

    grid: {n: [640, 6400, 64000], batch_size: [32, 64]}
    seeds: [0, 1]
    steps: 2000                 # matched step budget for every (n, B)
    measure_at: [500, 1000, 2000]
    jobs: 2                     # parallel processes (one torch thread each)
    run: {tau: 0.07, anchors: 2048, shadows: {...}, ...}   # any ShadowRun field

Outputs in OUT: errors.csv / errors.json (one row per method, n, B, seed, step), stress.csv / stress.md (the
paper's two stress tests in miniature: batch halved at fixed n, data set x10 at fixed B), and the plots
error_vs_ratio.{png,pdf} and error_over_steps.{png,pdf}.
"""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import yaml

from neuclip.error_study.shadow import ShadowRun, run

SWEEP_KEYS = {"grid", "seeds", "steps", "measure_at", "jobs", "run"}
# METHOD §6: OpenCLIP / FastCLIP / NeuCLIP; the sources disagree on which stress test each row belongs to.
PAPER_STRESS = {"openclip": (8.2, 12.8), "fastclip": (6.2, 9.4), "neuclip": (0.7, 1.9)}


def load_config(path: str | os.PathLike) -> dict:
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(cfg) - SWEEP_KEYS
    if unknown:
        raise KeyError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    if "grid" not in cfg or not {"n", "batch_size"} <= set(cfg["grid"]):
        raise KeyError(f"{path}: needs grid: {{n: [...], batch_size: [...]}}")
    fields = set(ShadowRun.__dataclass_fields__)
    bad = set(cfg.get("run", {})) - fields
    if bad:
        raise KeyError(f"{path}: unknown run option(s) {sorted(bad)}; allowed: {sorted(fields)}")
    return cfg


def _one(kwargs: dict) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    return run(ShadowRun(**kwargs), progress=lambda msg: print(msg, flush=True))


def run_sweep(cfg: dict, out_dir: str | os.PathLike) -> pd.DataFrame:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = int(cfg.get("steps", 1000))
    jobs = [
        {
            **cfg.get("run", {}),
            "n": n,
            "batch_size": b,
            "seed": s,
            "steps": steps,
            "measure_at": cfg.get("measure_at", [steps]),
        }
        for n, b, s in itertools.product(cfg["grid"]["n"], cfg["grid"]["batch_size"], cfg.get("seeds", [0]))
        if n >= 2 * b
    ]
    # Largest runs first, so the pool's tail is short.
    jobs.sort(key=lambda j: -j["n"] * j["batch_size"])
    workers = int(cfg.get("jobs", 1))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = [r for rs in pool.map(_one, jobs) for r in rs]
    else:
        rows = [r for j in jobs for r in _one(j)]
    frame = pd.DataFrame(rows).sort_values(["method", "batch_size", "n", "seed", "step"]).reset_index(drop=True)
    write_atomic(out / "errors.csv", frame.to_csv(index=False))
    write_atomic(out / "errors.json", json.dumps({"config": cfg, "rows": rows}, indent=1))
    stress = stress_table(frame)
    write_atomic(out / "stress.csv", stress.to_csv(index=False))
    write_atomic(out / "stress.md", stress.to_markdown(index=False, floatfmt=".3g") + "\n")
    from neuclip.error_study.plots import plot_error_over_steps, plot_error_vs_ratio

    plot_error_vs_ratio(frame, out / "error_vs_ratio")
    plot_error_over_steps(frame, out / "error_over_steps")
    return frame


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def stress_table(frame: pd.DataFrame, metric: str = "mse_log") -> pd.DataFrame:
    """Error growth under the paper's two stresses, at the final step, mean over seeds.

    batch halved: err(n, B/2) / err(n, B) for every n where both B and B/2 ran;
    data x10:     err(10 n, B) / err(n, B) for every B where both n and 10 n ran.
    """
    last = frame[frame["step"] == frame["steps"]]
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
                "scale": "small CPU (synthetic features)",
            }
        )
    return pd.DataFrame(rows)


def _mean(values):
    return sum(values) / len(values) if values else float("nan")
