"""`neuclip train CONFIG.yaml [key=value ...]`: train one model into its run folder (resumes if interrupted).

Overrides are dotted keys with YAML values, e.g. `train.lr=1e-3 method.options={rho: 6.5}`; a mapping
(method.options, launcher, meta) is updated key by key, and `KEY=null` empties it. Relative paths
(run_dir, data.train_shards, launcher.site) are taken from the current directory. `--print-config` shows the
resolved config and exits. See neuclip/train/schema.yaml for every key and its default, and
neuclip/grid/launcher.yaml for the launcher section's.
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    parser = sub.add_parser(
        "train", help="train a model (in-process, local, debug or SLURM via submitit)", description=__doc__
    )
    parser.add_argument("config", nargs="?", help="YAML config (omit to use only defaults and overrides)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, YAML values")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--detach", action="store_true", help="submit and return without waiting (local/slurm executors)"
    )
    parser.add_argument(
        "--supersede",
        action="store_true",
        help="if run_dir holds a run of another identity (a changed identity key, e.g. a method option), move it "
        "aside to EXPERIMENT.superseded/ and train afresh instead of refusing (the workflow's train rule)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from neuclip.grid.launcher import resolve_launcher
    from neuclip.train.config import ConfigError, dump, load_config, resolve
    from neuclip.train.data import DataError

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    try:
        cfg = resolve(resolve_launcher(load_config(config, overrides)))
        _check_method(cfg)
    except (ConfigError, DataError, FileNotFoundError, KeyError) as err:
        print(f"neuclip train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump(cfg), end="")
        return 0

    from neuclip.jobs.launch import launch
    from neuclip.train.trainer import TrainingDiverged

    try:
        return launch(cfg, detach=args.detach, supersede=args.supersede)
    except (ConfigError, DataError, TrainingDiverged) as err:
        print(f"neuclip train: error: {err}", file=sys.stderr)
        return 1


def _check_method(cfg: dict) -> None:
    """Fail before submitting anything (and before a run folder exists) if the method or an option is bad."""
    from neuclip.estimators.base import EstimatorContext
    from neuclip.estimators.registry import check_method
    from neuclip.train.config import ConfigError

    m = cfg["method"]
    d = cfg["data"]
    ctx = EstimatorContext(embed_dim=1, data_size=int(d["data_size"] or d["train_num_samples"] or 0),
                           num_samples=int(d["train_num_samples"] or 0))
    try:
        _, warnings = check_method(m["name"], m["options"], m["common_options"], ctx,
                                   int(cfg["train"]["global_batch_size"]))
    except ValueError as err:  # OptionError
        raise ConfigError(str(err)) from err
    for message in warnings:
        print(f"neuclip train: warning: method {m['name']!r}: {message}", file=sys.stderr)
