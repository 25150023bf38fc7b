"""`neuclip report`: tables, plots and provenance from a folder of finished runs and error studies."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    parser = sub.add_parser(
        "report",
        help="tables (CSV/Markdown/LaTeX), plots and provenance from finished runs",
        description=(
            "Reads every training run (a folder with done.json: config.yaml, provenance.json, metrics.jsonl, "
            "eval/<suite>/summary.json) and every error study (errors.csv + stress.csv) below RUNS, and writes "
            "OUT/tables/<table>.{csv,md,tex,provenance.json}, OUT/tables/missing.md, OUT/plots/*.{png,pdf} and "
            "OUT/index.md. Our numbers sit beside the published ones (results/published.yaml) at paper scale only."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--runs", required=True, help="runs root, e.g. runs/tiny")
    parser.add_argument("--out", required=True, help="results folder, e.g. results/tiny")
    parser.add_argument("--expect", default=None,
                        help="YAML list of expected cells [{dataset, scale, methods, seeds, variants}]; default: "
                             "data sets x methods x seeds found in the runs")
    parser.add_argument("--published", default=None, help="published numbers (default: results/published.yaml)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    parser.set_defaults(func=run)


def run(args) -> int:
    from neuclip.report.build import build_report

    try:
        info = build_report(args.runs, args.out, expect=args.expect, published=args.published, make_plots=args.plots)
    except (FileNotFoundError, ValueError) as err:
        print(f"neuclip report: {err}", file=sys.stderr)
        return 2
    for w in info["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{info['runs']} runs, {info['studies']} error studies -> {len(info['tables'])} tables, "
          f"{len(info['plots'])} plots; {info['missing']} missing table entries listed in {args.out}/tables/missing.md")
    print(f"wrote {args.out}/index.md")
    return 0
