"""`neuclip data`: generate the synthetic data set, index and check tar shards."""

from __future__ import annotations

import argparse
import os
import sys

from neuclip.commands import positive_int


def register(sub) -> None:
    parser = sub.add_parser("data", help="generate synthetic data; check image-text shards")
    data_sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True

    synth = data_sub.add_parser(
        "synth",
        help="generate the synthetic image-caption set (train shards + clip_benchmark eval sets)",
        description=(
            "Procedurally drawn shapes with captions naming their shape, colour, size and position. Writes "
            "OUT_DIR/train/{00000..}.tar (img2dataset's layout and keys: KEY.jpg/.txt/.json, sizes.json, "
            "*_stats.json, *.parquet, dataset.yaml with data_size = max key + 1 as `neuclip data download` writes), "
            "OUT_DIR/eval/wds_synth_{shape,colour,position,retrieval} (clip_benchmark wds/ layout) and "
            "OUT_DIR/manifest.json. The same seed gives byte-identical shards."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    synth.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (replaced if it holds a manifest)")
    synth.add_argument("--num-train", type=positive_int, default=4096, help="training samples")
    synth.add_argument("--num-eval", type=int, default=512, help="samples in each evaluation set")
    synth.add_argument("--seed", type=int, default=0, help="generator seed")
    synth.add_argument("--shard-size", type=int, default=1024, help="samples per tar shard")
    synth.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    synth.set_defaults(func=run_synth)

    check = data_sub.add_parser(
        "check",
        help="read every sample of image-text tar shards and report problems",
        description=(
            "Indexes every shard (the index the trainer reads, cached beside the shards), decodes every image, "
            "and applies the trainer's own definition of a bad sample (neuclip/data/check.py): no image, no "
            "or blank caption, no .json or no non-negative integer 'key' in it, an id seen before in any shard, "
            "an image that does not decode, an id at or above data_size (dataset.yaml beside the shards, or "
            "--data-size; without either, an id far beyond the others' is refused). Counts must match sizes.json / "
            "img2dataset *_stats.json. Exits "
            "non-zero on any problem. With --skip-bad (the trainer's data.skip_bad), bad samples and unreadable "
            "shards are listed as skipped and the exit status is 0; missing shards and count mismatches still fail."
        ),
    )
    check.add_argument(
        "pattern",
        metavar="PATTERN",
        help="shards: brace pattern ('data/train/{00000..00003}.tar'), glob, folder, or several joined by ::",
    )
    check.add_argument("--skip-bad", action="store_true", help="list bad samples as skipped and exit 0")
    check.add_argument("--data-size", type=positive_int, default=None,
                       help="the id space (max id + 1; the trainer's data.data_size): ids at or above it are bad")
    check.add_argument(
        "--no-ids",
        action="store_true",
        help="shards without sample ids (clip_benchmark eval sets): skip the .json checks",
    )
    check.set_defaults(func=run_check)

    index = data_sub.add_parser(
        "index",
        help="build the shards' indexes (what a trainer's start reads) for shards made elsewhere",
        description="Build the per-shard index of every shard matching PATTERN that lacks a fresh one, over "
        "--jobs processes. Resumable: indexes already built are kept. `neuclip data synth` and `neuclip data "
        "download` write them themselves; run this for shards that came from elsewhere, before training on them "
        "(a trainer builds missing ones itself, or refuses with data.missing_index: refuse). Processes that index "
        "the same shards at once share the work: each index is built once.",
    )
    index.add_argument("pattern", metavar="PATTERN", help="brace pattern, glob or folder of .tar shards")
    index.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                       help="processes (default: this machine's cores)")
    index.set_defaults(func=run_index)

    from neuclip.commands import data_fetch  # download (img2dataset), fetch-eval (clip_benchmark sets)

    data_fetch.register(data_sub)


def run_synth(args) -> int:
    import time

    from neuclip.data.synth import synthesize

    start = time.perf_counter()
    manifest = synthesize(
        args.out_dir,
        num_train=args.num_train,
        num_eval=args.num_eval,
        seed=args.seed,
        shard_size=args.shard_size,
        image_size=args.image_size,
    )
    train = manifest["train"]
    print(f"{args.out_dir}: {train['num_samples']} training samples in {len(train['shards'])} shards")
    for name, task in manifest["eval"].items():
        print(f"  eval/wds_{name}: {task['num_samples']} samples ({task['task']}, dataset {task['dataset']})")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def run_check(args) -> int:
    from neuclip.data.check import check_shards, format_report

    report = check_shards(args.pattern, skip_bad=args.skip_bad, need_ids=not args.no_ids, data_size=args.data_size)
    print(format_report(report))
    return 0 if report.ok else 1


def run_index(args) -> int:
    from neuclip.data.index import ensure_indexes, report_progress
    from neuclip.data.shards import expand_pattern

    shards = [str(p) for p in expand_pattern(args.pattern)]
    if not shards:
        print(f"neuclip data index: {args.pattern} matches no shards: check the path or pattern", file=sys.stderr)
        return 1
    done = ensure_indexes(shards, jobs=args.jobs, progress=report_progress("neuclip data index"))
    fresh = len(shards) - done.built - done.waited - done.bad
    print(f"{len(shards)} shards: {done.built} indexed, {fresh} already indexed, {done.waited} indexed by another "
          f"process meanwhile, {done.bad} unreadable (`neuclip data check` names them), in {done.seconds:.1f} s")
    return 0
