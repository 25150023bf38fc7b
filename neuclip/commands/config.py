"""`neuclip config EXPERIMENT.yaml DATASET METHOD [SEED] [--variant V]`: print one grid cell's train config.

The output is the file the workflow's train rule hands to `neuclip train` (neuclip.grid.workflow.train_config),
so a single cell of an experiment can be run, or inspected, by hand:

    neuclip config workflows/configs/paper.yaml cc3m neuclip 0 > cc3m_neuclip.yaml
    neuclip train cc3m_neuclip.yaml launcher.executor=slurm data.train_shards=/data/cc3m/{00000..00331}.tar
"""

from __future__ import annotations

import sys

from neuclip.yamlio import yaml_load


def register(sub) -> None:
    parser = sub.add_parser("config", help="print one experiment cell's `neuclip train` config", description=__doc__)
    parser.add_argument("experiment", help="experiment config, e.g. workflows/configs/paper.yaml")
    parser.add_argument("dataset")
    parser.add_argument("method")
    parser.add_argument("seed", nargs="?", type=int, help="default: the data set's first seed")
    parser.add_argument("--variant", default="default", help="an ablation variant label (default: default)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import yaml

    from neuclip.grid import workflow as wf

    try:
        config = yaml_load(Path(args.experiment).read_text())
        wf.validate_config(config)
    except Exception as err:  # unreadable or invalid (YAML, schema): name the file
        print(f"neuclip config: {args.experiment}: {err}", file=sys.stderr)
        return 2
    cells = wf.runs(config)
    seed = args.seed if args.seed is not None else wf.seeds_for(config, args.dataset)[0]
    cell = wf.Run(args.dataset, args.method, args.variant, seed)
    if cell not in cells:
        mine = [r for r in cells if r.dataset == cell.dataset]
        print(
            f"neuclip config: {args.experiment} has no cell {cell.key}. Its data sets: {_values('dataset', cells)}; "
            f"methods: {_values('method', cells)}; variants: {_values('variant', cells)}; "
            f"seeds of {cell.dataset}: {_values('seed', mine)}",
            file=sys.stderr,
        )
        return 2
    print(yaml.safe_dump(wf.train_config(config, cell), sort_keys=False), end="")
    return 0


def _values(field: str, cells: list) -> str:
    return ", ".join(dict.fromkeys(str(getattr(r, field)) for r in cells)) or "(none)"
