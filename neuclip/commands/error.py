"""`neuclip error`: the normaliser-error study (METHOD.md §6)."""

from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("error", help="normaliser-error study: exact normalisers vs each method's estimate")
    stages = parser.add_subparsers(dest="error_command", metavar="STAGE")
    stages.required = True
    sweep = stages.add_parser(
        "sweep",
        help="shadow-estimator sweep over n and B: errors.csv, stress tables, plots",
        description="Train one trajectory per (n, B, seed) and score every estimator against exact normalisers.",
    )
    sweep.add_argument("config", help="sweep YAML (see neuclip/error_study/sweep.py), e.g. workflows/configs/...")
    sweep.add_argument("--out", required=True, help="output folder")
    sweep.add_argument("--jobs", type=int, default=None, help="parallel processes (overrides the config)")
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
    one.set_defaults(func=run_one)


def run_one(args) -> int:
    from neuclip.error_study.run_error import score_run

    row = score_run(args.run_dir, anchors=args.anchors, shards=args.shards, batch=args.batch_size)
    print(json.dumps(row, indent=2))
    return 0


def run_sweep(args) -> int:
    from neuclip.error_study.sweep import load_config, run_sweep

    cfg = load_config(args.config)
    if args.jobs is not None:
        cfg["jobs"] = args.jobs
    frame = run_sweep(cfg, args.out)
    last = frame[frame["step"] == frame["steps"]]
    print(last.groupby(["method", "n_over_b"])["mse_log"].mean().unstack("method").to_string(float_format="%.3g"))
    print(f"wrote {args.out}/errors.csv, stress.md and plots")
    return 0
