"""`neuclip error`: the normaliser-error study (METHOD.md §6)."""

from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("error", help="normaliser-error study: exact normalisers vs each method's estimate")
    stages = parser.add_subparsers(dest="error_command", metavar="STAGE")
    stages.required = True
    sweep = stages.add_parser(
        "sweep",
        help="shadow-estimator sweep over n, B and budgets: errors, power-law fits, stress tables, plots",
        description="Train one trajectory per (n, B, seed, budget) and score every estimator against exact "
        "normalisers.",
    )
    sweep.add_argument("config", help="sweep YAML (see neuclip/error_study/sweep.py), e.g. workflows/configs/...")
    sweep.add_argument("--out", required=True, help="output folder")
    sweep.add_argument("--jobs", type=int, default=None, help="parallel processes (overrides the config)")
    sweep.add_argument("--experiment", default=None, help="with --launcher: name the job EXPERIMENT.error_sweep")
    sweep.add_argument(
        "--dry-run", action="store_true", help="list the runs (steps, rows measured per budget) and run nothing"
    )
    sweep.add_argument(
        "--unit-costs", nargs=3, type=float, metavar=("STEP_MS", "ROW_US", "ROW_ANCHOR_NS"), default=None,
        help="with --dry-run: measured cost of one training step (ms), of embedding one row (us) and of one "
        "(row, anchor) of the exact pass (ns); prints the estimated wall time",
    )
    from neuclip.jobs.launch import add_arguments

    add_arguments(sweep)  # --launcher YAML: the sweep as a job (CPU only), OUT its folder; --detach
    sweep.set_defaults(func=run_sweep)
    one = stages.add_parser(
        "run",
        help="error of one training run's own estimate (newest checkpoint) against exact normalisers",
        description="Embed the run's training data with its newest checkpoint and score the method's estimate.",
    )
    one.add_argument("run_dir", help="a `neuclip train` run folder")
    one.add_argument("--anchors", type=int, default=2048, help="fixed random anchor subset size")
    one.add_argument(
        "--shards", type=int, default=None, help="embed only the first N training shards (exact alpha* over those)"
    )
    one.add_argument("--batch-size", type=int, default=256, help="embedding batch size")
    add_arguments(one)  # --launcher YAML: the pass as a job, RUN/error its folder; --detach
    one.set_defaults(func=run_one)


def run_one(args) -> int:
    from neuclip.error_study.run_error import score_run

    if args.launcher is not None:
        from pathlib import Path

        from neuclip.jobs.launch import launch_stage, run_meta

        run = Path(args.run_dir).resolve()
        work = {"run": str(run), "anchors": args.anchors, "shards": args.shards, "batch_size": args.batch_size}
        meta = {**run_meta(run), "stage": "error"}
        return launch_stage("error-run", run / "error", work, args.launcher, meta=meta, detach=args.detach)

    row = score_run(args.run_dir, anchors=args.anchors, shards=args.shards, batch=args.batch_size)
    print(json.dumps(row, indent=2))
    return 0


def run_sweep(args) -> int:
    from neuclip.error_study.sweep import load_config, run_sweep

    if args.launcher is not None and not args.dry_run:
        from pathlib import Path

        from neuclip.jobs.launch import launch_stage

        out = Path(args.out).resolve()
        work = {"config": str(Path(args.config).resolve()), "jobs": args.jobs}
        meta = {"experiment": args.experiment, "stage": "error_sweep"} if args.experiment else {}
        return launch_stage("error-sweep", out, work, args.launcher, meta=meta, detach=args.detach)
    cfg = load_config(args.config)
    if args.jobs is not None:
        cfg["jobs"] = args.jobs
    if args.dry_run:
        from neuclip.error_study.sweep import estimate_wall_seconds, plan, plan_summary

        jobs = plan(cfg)
        print(plan_summary(jobs).to_string(float_format="%.4g"))
        if args.unit_costs:
            wall = estimate_wall_seconds(jobs, *args.unit_costs, workers=int(cfg.get("jobs", 1)))
            print(f"estimated wall time with {cfg.get('jobs', 1)} processes: {wall / 60:.1f} min")
        return 0
    frame = run_sweep(cfg, args.out)
    last = frame[frame["step"] == frame["steps"]]
    table = last.pivot_table(index=["budget", "batch_size", "n_over_b"], columns="method", values="mse_log", sort=False)
    print(table.to_string(float_format="%.3g"))
    print(f"wrote {args.out}/errors.csv, fits.csv, extrapolated.csv, summary.md, stress.md, timings.csv and plots")
    return 0
