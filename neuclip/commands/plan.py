"""`neuclip plan CONFIG.yaml [MORE.yaml ...]`: the grid as a table, checked, with what each cell costs.

Every cell goes through the preflight that `snakemake -n` runs (neuclip/grid/preflight.py), then one row per cell:
world size, global batch, steps, samples seen, model parameters, per-rank memory of the model + AdamW state
(16 bytes per parameter: weights, gradients, two moments) and of the per-sample estimator state, the checkpoint
size, GPU-hours at the ASSUMED samples/s per GPU of workflows/throughput.yaml (not measured here), the method's
rho beside what the rule log(n / 4B) gives, and the minutes from process start to the first batch measured by
`neuclip bench startup` (workflows/startup.yaml). Several files merge like Snakemake's --configfile (e.g.
paper.yaml rehearsal.yaml). `--launcher slurm` plans as `--profile slurm` runs (the profile sets it); the
default is the config's own.
"""

from __future__ import annotations

import sys

from neuclip.grid.experiment import load_experiment
from neuclip.yamlio import yaml_load


def register(sub) -> None:
    parser = sub.add_parser("plan", help="check every cell of an experiment and print what it costs",
                            description=__doc__)
    parser.add_argument("configs", nargs="+", help="experiment config file(s), merged in order")
    parser.add_argument("--launcher", choices=["inprocess", "local", "debug", "slurm"],
                        help="plan for this launcher (default: the config's; the SLURM profile uses slurm)")
    parser.add_argument("--slurm-site", default="slurm/site.yaml", help="site file the slurm launcher reads")
    parser.add_argument("--csv", help="also write the table as CSV here")
    parser.set_defaults(func=run)


def _model_params(name: str, cache: dict) -> int:
    if name not in cache:
        import open_clip
        import torch

        from neuclip.export import register_model_configs

        register_model_configs()
        with torch.device("meta"):  # shapes only: no memory, no init
            model = open_clip.create_model(name, pretrained=None, device="meta")
        cache[name] = sum(p.numel() for p in model.parameters())
    return cache[name]


def startup_minutes(num_samples: int | None, startup: dict | None) -> str | None:
    """'first / later' minutes to the first batch for a data set of `num_samples`, from workflows/startup.yaml."""
    if not startup or not num_samples:
        return None
    first, later = (startup[k]["seconds_fixed"] + startup[k]["seconds_per_sample"] * num_samples
                    for k in ("first_start", "later_start"))
    return f"{first / 60:.1f} / {later / 60:.1f}"


def rho_cell(options: dict, num_samples: int | None, batch: int) -> str:
    """The cell's rho, and in brackets what the rule log(n / 4B) gives for its n and B (neuclip/estimators/rho.py):
    a published recipe's rho may differ from the rule; a mistyped one shows."""
    from neuclip.estimators.rho import rho_for  # the estimators package loads torch: not at the CLI's start

    if "rho" not in options:
        return "—"  # the method has no temperature penalty
    rule = f" ({rho_for(num_samples, batch):.2f})" if num_samples else ""
    return f"{options['rho']:g}{rule}"


def rows(plans, throughput: dict, startup: dict | None = None) -> list[dict]:
    out, cache = [], {}
    gib = 1024**3
    for plan in plans:
        cfg = plan.cfg
        model, batch = cfg["model"], cfg["train"]["global_batch_size"]
        params = _model_params(model, cache)
        model_gib = 16 * params / gib
        rate = throughput.get(model)
        samples = plan.steps * batch
        out.append({
            "cell": plan.cell,
            "world": plan.world,
            "batch": batch,
            "steps": plan.steps,
            "samples seen": samples,
            "model": model,
            "params (M)": round(params / 1e6, 1),
            "model+AdamW GiB/rank": round(model_gib, 2),
            "per-sample state GiB/rank": round(plan.state_gib_per_rank, 2),
            "checkpoint GiB": round((model_gib * 12 / 16) + plan.state_gib_total, 2),  # weights + 2 moments + state
            "GPU-hours (assumed rate)": round(samples / rate / 3600, 1) if rate else None,
            "rho (rule)": rho_cell(plan.options, cfg["data"]["train_num_samples"], batch),
            "start-up min, first / later": startup_minutes(cfg["data"]["train_num_samples"], startup),
        })
    return out


def run(args) -> int:
    from pathlib import Path

    import pandas as pd

    import neuclip.grid.workflow as wf
    from neuclip.grid.preflight import PreflightError, preflight, print_warnings

    values = {}
    if args.launcher:
        values["launcher"] = args.launcher
        if args.launcher == "slurm":
            values["slurm_site"] = args.slurm_site
    try:
        config = load_experiment(args.configs, **values)
        plans = preflight(config)
    except (OSError, KeyError, ValueError, PreflightError) as err:
        print(f"neuclip plan: {err}", file=sys.stderr)
        return 2
    print_warnings(plans)
    throughput = yaml_load((wf.REPO / "workflows" / "throughput.yaml").read_text())
    startup_file = wf.REPO / "workflows" / "startup.yaml"
    startup = yaml_load(startup_file.read_text()) if startup_file.exists() else None
    table = pd.DataFrame(rows(plans, throughput["samples_per_second_per_gpu"], startup))
    print(table.to_markdown(index=False))
    total = table["GPU-hours (assumed rate)"].sum()
    print(f"\n{len(table)} cells, {total:,.0f} GPU-hours at the assumed samples/s per {throughput['assumed_gpu']} "
          "GPU of workflows/throughput.yaml (assumptions, not measurements).")
    if startup:
        print("Start-up: minutes from process start to the first batch, at the first start on a data-set version "
              "(indexes built, survey not yet stored) / at a later start, from workflows/startup.yaml (measured by "
              f"`{startup['measured_by']}` on {startup['date']}; rerun it on your file system).")
    if args.csv:
        Path(args.csv).write_text(table.to_csv(index=False))
    return 0
