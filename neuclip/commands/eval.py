"""`neuclip eval`: zero-shot evaluation of a saved model on a task suite, through clip_benchmark."""

from __future__ import annotations

import argparse
import sys

from neuclip.commands import positive_int
from neuclip.eval.precision import DEFAULT as DEFAULT_PRECISION
from neuclip.eval.precision import PRECISIONS

SUITE_HELP = {
    "tiny": "synthetic held-out sets (shape, colour, position classification; retrieval); --data-root = a "
    "`neuclip data synth` folder",
    "datacomp38": "DataComp's 38 tasks, main metrics and average; --data-root = DataComp's download_evalsets.py folder",
    "imagenet_variants": "the paper's 7-set mean top-1: IN-1k, IN-V2, IN-Sketch, IN-A, IN-O, IN-R, ObjectNet",
    "retrieval": "Flickr30k 1k and MSCOCO 5k test sets (mean of image and text recall@1) and WinoGAViL: DataComp's "
    "Retrieval group",
}


def register(sub) -> None:
    parser = sub.add_parser(
        "eval",
        help="zero-shot evaluation of a saved model on a task suite (clip_benchmark)",
        description=(
            "Evaluates MODEL_DIR (a run's model/ folder) on a suite through clip_benchmark's own code and the "
            "local data under --data-root. Writes OUT/<task>.json (clip_benchmark's result format) per task and "
            "OUT/summary.json (main metric per task, group averages). Missing data fails before any work, "
            "naming each set, where it goes and how to download it. A rerun skips finished tasks whose model and "
            "task definition (data set, size, metric, precision) are unchanged, and recomputes the others. Suites: "
            + "; ".join(f"{k}: {v}" for k, v in SUITE_HELP.items())
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-dir", required=True, help="saved model folder (RUN/model)")
    parser.add_argument("--suite", required=True, choices=list(SUITE_HELP), help="task suite")
    parser.add_argument("--data-root", required=True, help="folder holding the suite's evaluation sets")
    parser.add_argument("--out", required=True, help="output folder for task JSONs and summary.json")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    parser.add_argument("--workers", type=int, default=4, help="data loader worker processes")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="which passes run under autocast: datacomp = DataComp's choices (on CUDA: zero-shot classifier "
        "texts, retrieval and WinoGAViL in fp16 autocast, classification images in fp32; on CPU all fp32); "
        "fp32 = none; amp = all (fp16 on CUDA, bf16 on CPU)",
    )
    parser.add_argument("--redo", action="store_true", help="recompute every task, ignoring finished task files")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    from neuclip.jobs.launch import add_arguments

    add_arguments(parser)  # --launcher YAML (run as a job: OUT is its folder), --detach
    parser.set_defaults(func=run)


def run(args) -> int:
    from neuclip.eval.runner import ForeignResultsError, MissingDataError, evaluate_suite

    if args.launcher is not None:
        return _launch(args)

    try:
        summary = evaluate_suite(
            args.model_dir,
            args.suite,
            args.data_root,
            args.out,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            precision=args.precision,
            redo=args.redo,
            progress=args.progress,
        )
    except (MissingDataError, ForeignResultsError, FileNotFoundError) as err:
        print(f"neuclip eval: {err}", file=sys.stderr)
        return 2
    for task, entry in summary["tasks"].items():
        print(f"{task:<16} {entry['metric']:<22} {entry['value']:.4f}")
    for group, value in summary["groups"].items():
        if value is not None:
            print(f"{'[' + group + ']':<16} {'mean':<22} {value:.4f}")
    print(f"wrote {args.out}/summary.json")
    return 0


def _launch(args) -> int:
    """The evaluation as a job (neuclip/jobs/launch.py): OUT is the job folder, named after the run's cell."""
    from pathlib import Path

    from neuclip.jobs.launch import launch_stage, run_meta

    model_dir = Path(args.model_dir).resolve()
    work = {
        "model_dir": str(model_dir),
        "suite": args.suite,
        "data_root": str(Path(args.data_root).resolve()),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "precision": args.precision,
        "redo": args.redo,
    }
    meta = {**run_meta(model_dir.parent), "stage": "eval", "suite": args.suite}
    return launch_stage("eval", args.out, work, args.launcher, meta=meta, detach=args.detach)
