"""`neuclip study`: studies of many small runs on synthetic features."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("study", help="studies of many small training runs on synthetic paired features")
    studies = parser.add_subparsers(dest="study_command", metavar="STUDY")
    studies.required = True
    drivers = studies.add_parser(
        "drivers",
        help="every method trains its own runs over n/B, B, seeds and budgets: accuracy, final tau, own error",
        description="The driver study (neuclip/study/drivers.py): each method as it ships, rho by the data set's "
        "rule, learned and fixed temperatures; tables with t-intervals, the paper's claims checked, plots.",
    )
    drivers.add_argument("config", help="drivers YAML or an experiment config with a drivers: block")
    drivers.add_argument("--out", required=True, help="output folder (a rerun skips the runs already there)")
    drivers.add_argument("--jobs", type=int, default=None, help="parallel processes (overrides the config)")
    drivers.add_argument("--dry-run", action="store_true", help="list the runs and their steps; run nothing")
    drivers.set_defaults(func=run_drivers)
    capacity = studies.add_parser(
        "npn-capacity",
        help="NeuCLIP's prototype NPN fitted to exact targets on a frozen encoder: its error against tau and m",
        description="neuclip/study/npn_capacity.py: the best NeuCLIP's estimate can be at each tau and m.",
    )
    capacity.add_argument("--out", required=True, help="output folder (npn_capacity.csv/.md/.png/.pdf)")
    capacity.add_argument("--n", type=int, default=4096, help="samples of the synthetic set")
    capacity.add_argument("--taus", type=float, nargs="+", default=[0.07, 0.03, 0.015, 0.01])
    capacity.add_argument("--prototypes", type=int, nargs="+", default=[64, 256, 1024, 4096], help="values of m")
    capacity.add_argument("--fit-steps", type=int, default=300, help="full-batch AdaGrad steps of the fit")
    capacity.add_argument("--seed", type=int, default=0)
    capacity.set_defaults(func=run_capacity)


def run_drivers(args) -> int:
    from neuclip.study.drivers import load_config, plan, run_study

    cfg = load_config(args.config)
    if args.dry_run:
        entries = plan(cfg)
        steps = sum(e["run"]["steps"] for e in entries)
        print(f"{len(entries)} runs, {steps} training steps in all")
        return 0
    run_study(cfg, args.out, jobs=args.jobs)
    return 0


def run_capacity(args) -> int:
    from neuclip.study.npn_capacity import main

    frame = main(args.out, n=args.n, taus=args.taus, prototypes=args.prototypes, fit_steps=args.fit_steps,
                 seed=args.seed)
    print(frame[["tau", "m", "abs_err", "abs_err_at_start", "mse"]].to_string(index=False))
    return 0
