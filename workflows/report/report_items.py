"""Sort what `neuclip report` wrote into the four folders `snakemake --report` embeds (workflows/report.smk).

Usage: python workflows/report/report_items.py RESULTS_DIR  (RESULTS_DIR = results/<experiment>)

Snakemake's HTML report shows images and HTML inline and offers other files for download, so each table's
Markdown (tables/NAME.md: title, mean ± std cells, notes) becomes a small standalone HTML page; plots are
copied as PNG; error_curves.csv (the data behind the error-over-training plots) is kept as a download. A
table or plot this map does not know is an error, so a new one cannot silently miss the report.
"""

from __future__ import annotations

import html
import re
import shutil
import sys
from pathlib import Path

import markdown

CATEGORIES = ("main_tables", "error_study", "training_curves", "per_run")
TABLES = {  # table name (or prefix ending in "_") -> category
    "main": "main_tables", "imagenet_variants": "main_tables", "retrieval": "main_tables",
    "fastclip_comparison": "main_tables", "ablation_": "main_tables", "missing": "main_tables",
    "stress": "error_study", "runs": "per_run",
}  # fmt: skip
PLOTS = {"ablation_": "main_tables", "error_vs_ratio": "error_study", "error_over_steps": "error_study",
         "error_training_": "error_study", "training_": "training_curves"}  # fmt: skip
DATA = {"error_curves": "error_study"}
STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left}
th{background:#eef}tr:nth-child(even) td{background:#f8f8f8}li{margin:.2em 0;max-width:70em}"""


def category(name: str, known: dict[str, str], kind: str) -> str:
    for key, cat in sorted(known.items(), key=lambda kv: -len(kv[0])):  # longest match: error_training_ first
        if name == key or (key.endswith("_") and name.startswith(key)):
            return cat
    raise SystemExit(f"report_items.py: {kind} {name!r} has no report category: add it to {kind.upper()}S")


def page(md_text: str, name: str) -> str:
    title = re.search(r"^#+\s*(.+)$", md_text, re.M)
    body = markdown.markdown(md_text, extensions=["tables"])
    head = html.escape(title.group(1) if title else name)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{head}</title><style>{STYLE}</style>"
            f"</head><body>{body}</body></html>\n")  # fmt: skip


def sort_items(results: Path) -> dict[str, list[str]]:
    out = results / "report"
    shutil.rmtree(out, ignore_errors=True)
    for cat in CATEGORIES:
        (out / cat).mkdir(parents=True)
    placed: dict[str, list[str]] = {cat: [] for cat in CATEGORIES}
    for md in sorted((results / "tables").glob("*.md")):
        cat = category(md.stem, TABLES, "table")
        (out / cat / f"{md.stem}.html").write_text(page(md.read_text(), md.stem))
        placed[cat].append(f"{md.stem}.html")
    for csv in sorted((results / "tables").glob("*.csv")):
        if csv.stem in DATA:
            shutil.copyfile(csv, out / DATA[csv.stem] / csv.name)
            placed[DATA[csv.stem]].append(csv.name)
    for png in sorted((results / "plots").glob("*.png")):
        cat = category(png.stem, PLOTS, "plot")
        shutil.copyfile(png, out / cat / png.name)
        placed[cat].append(png.name)
    return placed


if __name__ == "__main__":
    for cat, names in sort_items(Path(sys.argv[1])).items():
        print(f"{cat}: {', '.join(names) or '(none)'}")
