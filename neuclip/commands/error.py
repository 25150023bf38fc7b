"""`neuclip error`: the normaliser-error study (METHOD.md §6)."""

from __future__ import annotations


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
