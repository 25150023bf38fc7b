"""`neuclip data download`: image-text shards from a URL list, made by img2dataset itself.

img2dataset runs in an environment of its own (`make img2dataset` makes `.venv-img2dataset/`; see
requirements-img2dataset.txt for why), started as a separate program with the options of
neuclip/data/download.yaml for the data set, overridden by a site file and `--set`. We never imitate
what it writes; afterwards we only read its per-shard `NNNNN_stats.json` and add what the trainer and the
registry need:

- `sizes.json` (shard -> samples written), which open_clip and `neuclip data check` read;
- `dataset.yaml`: the shard pattern, num_samples, and data_size = max key + 1 from img2dataset's key scheme
  (neuclip/data/keys.py, shared with `neuclip data synth`: a row's key is shard * 10^ceil(log10(samples per
  shard)) + its row in the shard, so failed rows leave holes and data_size > num_samples); plus the options
  used, so a resume with different layout options is refused instead of mixing two key schemes in one folder;
- `download_report.md`: per shard, rows, successes and the failures by reason (img2dataset's status_dict);
- each shard's index (neuclip/data/index.py), built over img2dataset's `processes_count` processes, so the
  trainer's start reads indexes and scans no tar.

Resuming is img2dataset's own incremental mode: a shard with a `_stats.json` is done, others are redone. Its
check globs `OUT/*.json` and parses every name as a shard number, so our own `sizes.json` is removed before
img2dataset starts and written again after it (it is derived from the stats files; nothing is lost).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from neuclip.atomic import write_atomic, write_json
from neuclip.data import keys
from neuclip.data.index import ensure_indexes
from neuclip.data.keys import INFO
from neuclip.yamlio import yaml_load

RECIPES = Path(__file__).resolve().with_name("download.yaml")
REPO = Path(__file__).resolve().parent.parent.parent
VENV = REPO / ".venv-img2dataset"
REPORT = "download_report.md"
STATS = re.compile(r"^(\d+)_stats\.json$")
# Options that decide what the files and keys look like: a resume must use the same ones.
LAYOUT = (
    "input_format", "url_col", "caption_col", "save_additional_columns", "bbox_col", "number_sample_per_shard",
    "oom_shard_count", "output_format", "image_size", "resize_mode", "resize_only_if_bigger", "encode_format",
    "encode_quality",
)  # fmt: skip
# Runs inside the img2dataset environment: the options arrive as one JSON argument, so no shell or python-fire
# parsing can turn "00001" into 1 or a list into a string.
RUNNER = (
    "import json, sys\n"
    "from importlib.metadata import version\n"
    "import img2dataset\n"
    "print('img2dataset', version('img2dataset'), flush=True)\n"
    "img2dataset.download(**json.loads(sys.argv[1]))\n"
)
FIX_ENV = "run `make img2dataset` (creates .venv-img2dataset/, about 70 s) or set NEUCLIP_IMG2DATASET"


class DownloadError(RuntimeError):
    """Bad options, a missing img2dataset, or an output folder that cannot be resumed; says what to do."""


# -- options --------------------------------------------------------------------------------------------


def recipes() -> dict[str, dict]:
    return yaml_load(RECIPES.read_text())["datasets"]


def parse_sets(pairs: list[str]) -> dict:
    """KEY=VALUE pairs (values parsed as YAML: 4, true, [uid], null) into a mapping."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DownloadError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set processes_count=32")
        out[key.strip()] = yaml_load(value)
    return out


def options(dataset: str, url_list: str | os.PathLike, out: str | os.PathLike, site: dict | None = None) -> dict:
    """img2dataset.download keyword arguments: the data set's recipe, then `site` (file or --set) on top."""
    known = recipes()
    if dataset not in known:
        raise DownloadError(f"no download recipe for {dataset!r} in {RECIPES}; known: {', '.join(known)}")
    opts = dict(known[dataset])
    opts.update(site or {})
    for key in ("url_list", "output_folder"):
        if key in (site or {}):
            raise DownloadError(f"option {key!r} is set by --url-list / --out, not by --set or --config")
    opts["url_list"], opts["output_folder"] = str(Path(url_list).absolute()), str(Path(out).absolute())
    if opts.get("output_format") != "webdataset":
        raise DownloadError(f"output_format {opts.get('output_format')!r}: the trainer reads webdataset tar shards")
    if opts.get("incremental_mode") != "incremental":
        raise DownloadError("incremental_mode must stay 'incremental' (resume); delete the folder to start over")
    return opts


def img2dataset_python() -> str:
    """The Python that has img2dataset: $NEUCLIP_IMG2DATASET, then .venv-img2dataset, then this one."""
    explicit = os.environ.get("NEUCLIP_IMG2DATASET")
    if explicit:
        if not Path(explicit).exists():
            raise DownloadError(f"NEUCLIP_IMG2DATASET={explicit} does not exist: {FIX_ENV}")
        return explicit
    venv = VENV / "bin" / "python"
    if venv.exists():
        return str(venv)
    try:
        import img2dataset  # noqa: F401  (someone installed it into this environment)
    except ImportError:
        raise DownloadError(f"img2dataset not found (looked in {VENV} and this environment): {FIX_ENV}") from None
    return sys.executable


# -- img2dataset's key scheme and stats files -----------------------------------------------------------


@dataclass
class ShardStats:
    shard: int
    name: str  # NNNNN.tar
    count: int  # input rows of this shard
    successes: int  # samples written to the tar
    failed_to_download: int
    failed_to_resize: int
    reasons: dict = field(default_factory=dict)  # img2dataset's status_dict without "success"

    @property
    def failed(self) -> int:
        return self.count - self.successes


def read_stats(out: Path, oom_shard_count: int) -> list[ShardStats]:
    found = []
    for path in sorted(out.glob("*_stats.json")):
        match = STATS.match(path.name)
        if not match:
            continue
        s = json.loads(path.read_text())
        reasons = {k: v for k, v in (s.get("status_dict") or {}).items() if k != "success"}
        shard = int(match.group(1))
        found.append(
            ShardStats(
                shard, f"{shard:0{oom_shard_count}d}.tar", int(s["count"]), int(s["successes"]),
                int(s.get("failed_to_download", 0)), int(s.get("failed_to_resize", 0)), reasons,
            )  # fmt: skip
        )
    return found


def key_space(stats: list[ShardStats], per_shard: int) -> int:
    """data_size: one more than the largest key img2dataset can have given out (failed rows included)."""
    return keys.key_space(((s.shard, s.count) for s in stats), per_shard)


def input_rows(url_list: Path, input_format: str) -> list[int] | None:
    """Rows of each input file in img2dataset's order (a folder: its *.FORMAT files, sorted); None: unknown."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    files = sorted(url_list.glob(f"*.{input_format}")) if url_list.is_dir() else [url_list]
    rows = []
    for f in files:
        if input_format == "parquet":
            rows.append(pq.ParquetFile(f).metadata.num_rows)
        elif input_format.split(".")[0] in ("tsv", "csv", "txt"):
            kind = input_format.split(".")[0]
            parse = pa_csv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
            read = pa_csv.ReadOptions(column_names=["url"]) if kind == "txt" else None
            with pa_csv.open_csv(f, read_options=read, parse_options=parse) as reader:
                rows.append(sum(batch.num_rows for batch in reader))
        else:
            return None
    return rows


# -- summary --------------------------------------------------------------------------------------------


def report_table(stats: list[ShardStats]) -> str:
    """Markdown: one row per shard, then the failures of all shards by reason."""
    lines = ["| shard | rows | written | failed download | failed resize | reasons |", "|---|---:|---:|---:|---:|---|"]
    for s in stats:
        why = "; ".join(f"{_cell(r)} ×{n}" for r, n in sorted(s.reasons.items(), key=lambda x: -x[1])[:3])
        lines.append(
            f"| {s.name} | {s.count} | {s.successes} | {s.failed_to_download} | {s.failed_to_resize} | {why} |"
        )
    total = Counter()
    for s in stats:
        total.update(s.reasons)
    rows, ok = sum(s.count for s in stats), sum(s.successes for s in stats)
    lines.append(
        f"| total ({len(stats)} shards) | {rows} | {ok} | {sum(s.failed_to_download for s in stats)} | "
        f"{sum(s.failed_to_resize for s in stats)} | |"
    )
    lines += ["", "| failure reason | samples |", "|---|---:|"]
    lines += [f"| {_cell(reason)} | {n} |" for reason, n in total.most_common()] or ["| (none) | 0 |"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A failure reason as one Markdown table cell: one line, pipes escaped (a redirect loop's is several lines)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def shard_pattern(out: Path, names: list[str]) -> str:
    """A brace pattern for consecutive shard names, else the names joined with '::'."""
    if not names:
        return ""
    first, last = names[0].split(".")[0], names[-1].split(".")[0]
    if int(last) - int(first) + 1 == len(names):
        return str(out / (f"{{{first}..{last}}}.tar" if len(names) > 1 else names[0]))
    return "::".join(str(out / n) for n in names)


# -- the command ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_group_on_exit(proc: subprocess.Popen):
    """SIGTERM becomes an exception here while img2dataset runs; on any exception (SIGINT's KeyboardInterrupt
    included) its whole process group is sent SIGTERM, then SIGKILL after 10 s."""
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except BaseException:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


INPUT = "url_list.sha256"  # the URL list a folder is downloaded from (not *.json: img2dataset's resume globs those)


def input_digest(url_list: Path, input_format: str) -> str:
    """sha256 over the URL list's files (a folder: its *.FORMAT files, sorted, names included)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(url_list.glob(f"*.{input_format}")) if url_list.is_dir() else [url_list]
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _same_list(out: Path, url_list: Path, opts: dict, other_list: bool) -> None:
    """A folder resumes from the URL list it started with: another list would mix two lists' rows under one
    key scheme while dataset.yaml still said every row of the first was done."""
    digest = input_digest(url_list, opts["input_format"])
    record = out / INPUT
    if record.exists() and not other_list:
        before = record.read_text().split()[0]
        if before != digest:
            raise DownloadError(
                f"{out} was downloaded from another URL list (sha256 {before[:12]}... then, {digest[:12]}... now, "
                f"{url_list}): resume with the same list, use another --out, or pass --other-list to add this "
                "list's rows to the folder knowingly"
            )
    record.write_text(f"{digest}  {url_list}\n")


URL_SAFE = ":/?#[]@!$&'()*+,;=%~-._"  # what a browser leaves as it is: only the rest (non-ASCII, spaces) is encoded


def browser_url(url: str) -> str:
    """A URL as a browser sends it: non-ASCII characters (and spaces) percent-encoded as UTF-8, the rest kept."""
    from urllib.parse import quote

    return url if url.isascii() and " " not in url else quote(url, safe=URL_SAFE)


def ascii_urls(url_list: Path, opts: dict, out: Path) -> Path | None:
    """When some URL of a TSV/CSV list is not ASCII, a copy of the list with those URLs percent-encoded, in
    OUT/url_list.encoded/ (img2dataset reads it; the rows and their order are the same, so are the keys); None
    when every URL is already ASCII. Valid images behind non-ASCII URLs were lost otherwise."""
    kind = opts["input_format"].split(".")[0]
    if kind not in ("tsv", "csv") or not opts.get("url_col"):
        return None
    files = sorted(url_list.glob(f"*.{opts['input_format']}")) if url_list.is_dir() else [url_list]
    sep = "\t" if kind == "tsv" else ","
    copies, changed = [], False
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        col = lines[0].rstrip("\r\n").split(sep).index(opts["url_col"]) if lines else 0
        fixed = lines[:1]
        for line in lines[1:]:
            end = line[len(line.rstrip("\r\n")):]
            cells = line.rstrip("\r\n").split(sep)
            if col < len(cells):
                new = browser_url(cells[col])
                changed |= new != cells[col]
                cells[col] = new
            fixed.append(sep.join(cells) + end)
        copies.append((f.name, "".join(fixed)))
    if not changed:
        return None
    folder = out / "url_list.encoded"
    folder.mkdir(exist_ok=True)
    for name, text in copies:
        (folder / name).write_text(text, encoding="utf-8")
    return folder if url_list.is_dir() else folder / copies[0][0]


def check_header(url_list: Path, opts: dict) -> None:
    """The columns img2dataset will look for must be in the list's header (it fails after minutes otherwise)."""
    kind = opts["input_format"].split(".")[0]
    if kind == "txt":
        return
    files = sorted(url_list.glob(f"*.{opts['input_format']}")) if url_list.is_dir() else [url_list]
    wanted = [c for c in (opts.get("url_col"), opts.get("caption_col")) if c]
    for f in files:
        if kind == "parquet":
            import pyarrow.parquet as pq

            columns = pq.ParquetFile(f).schema_arrow.names
        elif kind in ("tsv", "csv"):
            with open(f, encoding="utf-8", errors="replace") as text:
                columns = text.readline().rstrip("\r\n").split("\t" if kind == "tsv" else ",")
        else:
            return
        missing = [c for c in wanted if c not in columns]
        if missing:
            shown = ", ".join(repr(c) for c in columns[:6])
            raise DownloadError(
                f"{f}: no column {', '.join(map(repr, missing))} in its header ({shown}): its first line must name "
                f"the columns (url_col {opts.get('url_col')!r}, caption_col {opts.get('caption_col')!r}), e.g. "
                f"'{(chr(9) if kind == 'tsv' else ',').join(wanted)}'"
            )


def _prepare(out: Path, opts: dict) -> None:
    """Refuse a folder downloaded with other layout options or holding JSON img2dataset would misread."""
    info_file = out / INFO
    if info_file.exists():
        before = (yaml_load(info_file.read_text()) or {}).get("img2dataset", {}).get("options", {})
        changed = [k for k in LAYOUT if k in before and before.get(k) != opts.get(k)]
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} then, {opts.get(k)!r} now" for k in changed)
            raise DownloadError(f"{out} was downloaded with other settings ({diff}): use them, or another --out")
    (out / "sizes.json").unlink(missing_ok=True)  # derived; img2dataset's resume would read it as a shard
    foreign = [p.name for p in out.glob("*.json") if not STATS.match(p.name)]
    if foreign:
        raise DownloadError(
            f"{out} holds {', '.join(foreign)}: img2dataset's resume parses every *.json there as a shard's "
            "stats file; move them elsewhere"
        )


def download(dataset: str, url_list, out, site: dict | None = None, echo=print, other_list: bool = False) -> dict:
    """Run img2dataset (resuming), then write sizes.json, dataset.yaml and download_report.md; return the
    dataset.yaml content. Raises DownloadError when img2dataset fails or shards are still missing."""
    url_list, out = Path(url_list), Path(out).absolute()
    if not url_list.exists():
        raise DownloadError(f"--url-list {url_list} does not exist")
    opts = options(dataset, url_list, out, site)
    check_header(url_list, opts)
    out.mkdir(parents=True, exist_ok=True)
    _prepare(out, opts)
    _same_list(out, url_list, opts, other_list)
    rows = input_rows(url_list, opts["input_format"])
    encoded = ascii_urls(url_list, opts, out)
    if encoded is not None:
        echo(f"neuclip data download: URLs with non-ASCII characters percent-encoded (as browsers send them) in "
             f"{encoded}; img2dataset reads that copy")
        opts = {**opts, "url_list": str(encoded)}
    python = img2dataset_python()
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    log = out / "img2dataset.log"
    version, tail = None, []
    # img2dataset in a process group of its own, stopped whole when this command is interrupted (SIGINT, SIGTERM):
    # its worker processes would otherwise go on writing shards after we are gone
    with open(log, "a") as log_file, subprocess.Popen(
        [python, "-c", RUNNER, json.dumps(opts)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    ) as proc, _stop_group_on_exit(proc):
        for line in proc.stdout:  # img2dataset's progress, shown and kept
            log_file.write(line)
            echo(line.rstrip("\n"))
            tail = (tail + [line.rstrip("\n")])[-15:]
            if version is None and line.startswith("img2dataset "):
                version = line.split()[1]
    if proc.returncode != 0:
        raise DownloadError(f"img2dataset failed (exit {proc.returncode}; log {log}):\n" + "\n".join(tail))

    oom = int(opts["oom_shard_count"])
    per_shard = int(opts["number_sample_per_shard"])
    stats = read_stats(out, oom)

    sizes = {s.name: s.successes for s in stats if (out / s.name).exists()}
    write_json(out / "sizes.json", sizes)
    expected = sum(math.ceil(n / per_shard) for n in rows) if rows is not None else None
    missing = [s.name for s in stats if s.name not in sizes]
    info = {
        "dataset": dataset,
        "shards": shard_pattern(out, list(sizes)),
        "num_samples": sum(sizes.values()),
        "data_size": key_space(stats, per_shard),
        "input_rows": sum(rows) if rows is not None else None,
        "rows_done": sum(s.count for s in stats),
        "shards_done": len(sizes),
        "shards_expected": expected,
        "failures": dict(sum((Counter(s.reasons) for s in stats), Counter()).most_common()),
        "key_scheme": keys.key_scheme(per_shard, oom),
        "img2dataset": {"version": version, "python": python, "options": opts},
    }
    # the index is made where the data is made: a trainer's start then reads it and scans no tar
    ensured = ensure_indexes([str(out / name) for name in sorted(sizes)], jobs=int(opts.get("processes_count") or 1))
    echo(f"shard indexes: {ensured.built} built, {len(sizes) - ensured.built - ensured.bad} already there, "
         f"{ensured.bad} unreadable, in {ensured.seconds:.1f} s")
    write_atomic(out / INFO, "# written by `neuclip data download`; registry fields: shards, num_samples, data_size\n"
               + yaml.safe_dump(info, sort_keys=False))  # fmt: skip
    write_atomic(out / REPORT, f"# {dataset}: img2dataset per-shard stats\n\n{report_table(stats)}\n")
    echo(report_table(stats) if len(stats) <= 20 else report_table(stats).split("\n\n")[-1])
    echo(f"\n{out / INFO}: num_samples {info['num_samples']}, data_size {info['data_size']}")
    echo(f"registry entry: dataset_overrides: {{{dataset}: {{shards: '{info['shards']}', "
         f"num_samples: {info['num_samples']}, data_size: {info['data_size']}}}}}")  # fmt: skip
    if missing or (expected is not None and len(sizes) < expected):
        raise DownloadError(
            f"{len(sizes)} of {expected if expected is not None else '?'} shards finished"
            + (f" ({', '.join(missing)} have stats but no tar)" if missing else "")
            + ": run the same command again to resume"
        )
    return info
