"""`neuclip data download` (training shards through img2dataset) and `neuclip data fetch-eval` (evaluation sets)."""

from __future__ import annotations

import argparse
import sys


def register(data_sub) -> None:
    dl = data_sub.add_parser(
        "download",
        help="download image-text shards from a URL list with img2dataset (resumable)",
        description=(
            "Runs img2dataset (its own environment, `make img2dataset`) with DATASET's recipe from "
            "neuclip/configs/download.yaml (FastCLIP's CC3M/CC12M layout, DataComp's settings for DataComp/DFN, "
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
    dl.set_defaults(func=run_download)


def run_download(args) -> int:
    import yaml

    from neuclip.data.download import DownloadError, download, parse_sets

    try:
        site = {}
        if args.config:
            site = yaml.safe_load(open(args.config)) or {}
            if not isinstance(site, dict):
                raise DownloadError(f"--config {args.config}: expected a mapping of img2dataset options")
        site.update(parse_sets(args.sets))
        download(args.dataset, args.url_list, args.out, site)
    except DownloadError as err:
        print(f"neuclip data download: {err}", file=sys.stderr)
        return 1
    return 0
