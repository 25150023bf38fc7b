"""`neuclip data download` (training shards through img2dataset) and `neuclip data fetch-eval` (evaluation sets)."""

from __future__ import annotations

import argparse
import sys

from neuclip.yamlio import yaml_load


def register(data_sub) -> None:
    dl = data_sub.add_parser(
        "download",
        help="download image-text shards from a URL list with img2dataset (resumable)",
        description=(
            "Runs img2dataset (its own environment, `make img2dataset`) with DATASET's recipe from "
            "neuclip/data/download.yaml (FastCLIP's CC3M/CC12M layout, DataComp's settings for DataComp/DFN, "
            "uid kept), then writes OUT/sizes.json, OUT/dataset.yaml (shards, num_samples, data_size = max key "
            "+ 1 for the registry) and OUT/download_report.md (per-shard successes and failures by reason). "
            "Run it again to resume: finished shards are kept. A CC3M/CC12M TSV needs a header line "
            "'caption<TAB>url'."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    dl.add_argument("dataset", metavar="DATASET", help="a data set with a recipe (cc3m, cc12m, datacomp_small, ...)")
    dl.add_argument("--url-list", required=True, help="URL list: a .tsv/.csv/.parquet file or a folder of them")
    dl.add_argument("--out", required=True, help="output folder for the shards")
    dl.add_argument("--config", help="YAML mapping of img2dataset options over the recipe (a site file)")
    dl.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="one img2dataset option over the recipe and --config, e.g. processes_count=32 (repeatable)",
    )  # fmt: skip
    dl.add_argument("--other-list", action="store_true",
                    help="resume a folder with a URL list other than the one it started from (its rows are added)")
    dl.set_defaults(func=run_download)

    fe = data_sub.add_parser(
        "fetch-eval",
        help="fetch the clip_benchmark evaluation sets a suite needs (as DataComp's download_evalsets.py)",
        description=(
            "For each task of SUITE missing under ROOT (the check `neuclip eval` makes), downloads "
            "djghosh/wds_<task>_test from the Hugging Face Hub into ROOT/wds_<task>_test (resumable, files "
            "verified by etag), and the nlphuji/... retrieval sets into ROOT/hf_cache with `datasets`. Sets "
            "already present are listed and left alone. Without network it stops after one probe of --timeout "
            "seconds, naming what is missing."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fe.add_argument("suite", metavar="SUITE", help="tiny, datacomp38, imagenet_variants or retrieval")
    fe.add_argument("--root", required=True, help="evaluation data root (the eval_data_root of the workflow)")
    fe.add_argument("--timeout", type=float, default=10.0, help="seconds for the Hub probe and each file's etag")
    fe.set_defaults(func=run_fetch_eval)


def run_download(args) -> int:
    from neuclip.data.download import DownloadError, download, parse_sets

    try:
        site = {}
        if args.config:
            site = yaml_load(open(args.config)) or {}
            if not isinstance(site, dict):
                raise DownloadError(f"--config {args.config}: expected a mapping of img2dataset options")
        site.update(parse_sets(args.sets))
        download(args.dataset, args.url_list, args.out, site, other_list=args.other_list)
    except DownloadError as err:
        print(f"neuclip data download: {err}", file=sys.stderr)
        return 1
    return 0


def run_fetch_eval(args) -> int:
    from neuclip.eval.fetch import FetchError, fetch_eval

    try:
        return fetch_eval(args.suite, args.root, timeout=args.timeout)
    except (FetchError, KeyError) as err:
        print(f"neuclip data fetch-eval: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 1
