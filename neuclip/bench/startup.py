"""`neuclip bench startup`: from process start to the first batch at DFN-1B size, without the data.

Two parts.
1. The index scan, per core: the same img2dataset-style shards (10,000 samples of jpg/txt/json each) indexed
   by TarScan (os.pread over the headers) and by the tarfile scan it replaced (neuclip/data/tar_reference.py),
   alternating, best of 3, in this process's CPU time.
2. A start at N samples in shards of 10,000: sparse stand-in tars (their size and mtime are all an index is
   keyed by) and synthetic indexes with img2dataset's keys, written once under --work. Each N is measured in a
   fresh process twice: a first start (no stored survey: every index's freshness checked, every index read, the
   duplicate-id check) and a later start (the stored survey read back). Each piece is timed as the trainer runs
   it (neuclip/train/setup.py make_data, neuclip/train/data.py), then the first batch's samples are looked up:
   its positions and the index of each shard it touches (decoding is `neuclip bench loader`'s part). Peak
   resident memory is the process's. DFN-1B (1.4e9) and LAION-315M (315.7e6) figures are extrapolated linearly
   from the two largest N measured.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import neuclip.train.data  # noqa: F401
from neuclip.atomic import write_atomic
from neuclip.bench.common import command_line, machine_line, publish
from neuclip.data import check
from neuclip.data.index import ShardIndex, build_index, index_is_fresh, save_index, shard_index
from neuclip.data.keys import data_size_of, data_size_source, img2dataset_key, key_space
from neuclip.data.shards import TarScan, expand_pattern, write_tar
from neuclip.data.survey_cache import cached_survey
from neuclip.data.tar_reference import TarfileScan
from neuclip.train.data import EpochOrder

SHARD = 10_000  # img2dataset's default samples per shard, and DFN's
BATCH = 5120  # the paper's DFN global batch
TARGETS = {"LAION-315M": 315_700_000, "DFN-1B": 1_400_000_000}


def add_arguments(parser) -> None:
    parser.add_argument("--work", default="/tmp/neuclip-bench-startup", help="folder for the stand-in data")
    parser.add_argument("--samples", default="1e6,1e7,1e8", help="comma-separated N to measure")
    parser.add_argument("--scan-shards", type=int, default=2, help="10,000-sample shards for the scan comparison")
    parser.add_argument("--image-kb", type=int, default=16, help="image member size in the scan comparison")
    parser.add_argument("--ranks", type=int, default=8, help="ranks of the job the extrapolation describes")
    parser.add_argument("--write", metavar="MD", help="write the result section into this file (docs/benchmarks.md)")
    parser.add_argument("--plan-file", metavar="YAML",
                        help="write the fitted start-up cost here for `neuclip plan` (workflows/startup.yaml)")


# -- 1. the scan -------------------------------------------------------------------------------------------


def _scan_shards(work: Path, shards: int, image_kb: int) -> list[Path]:
    out = work / f"scan-{shards}x{SHARD}-{image_kb}k"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = out / f"{s:05d}.tar"
        if not path.exists():
            def samples(s=s):
                for row in range(SHARD):
                    key = img2dataset_key(s, row, SHARD)
                    meta = {"url": f"https://example.org/{key}.jpg", "caption": f"a photo number {row}", "key": key,
                            "status": "success", "error_message": None, "width": 224, "height": 224,
                            "original_width": 640, "original_height": 480, "exif": "{}", "sha256": "0" * 64}
                    yield key, {"jpg": rng.bytes(image_kb * 1024), "txt": meta["caption"].encode(),
                                "json": json.dumps(meta).encode()}

            write_tar(path, samples())
        paths.append(path)
    return paths


def _scan_rates(paths: list[Path]) -> dict[str, float]:
    scanners = {"TarScan (os.pread over the headers)": TarScan, "tarfile (the scan it replaced)": TarfileScan}
    best = dict.fromkeys(scanners, 0.0)
    for _ in range(3):  # alternate: drift on a shared machine hits both alike
        for name, scanner in scanners.items():
            t0, n = time.process_time(), 0
            for path in paths:
                n += len(build_index(path, scanner))
            best[name] = max(best[name], n / (time.process_time() - t0))
    return best


# -- 2. a start at N samples -------------------------------------------------------------------------------


def _stand_in(work: Path, n: int) -> Path:
    """S = n / 10,000 sparse tars and their synthetic indexes (written once)."""

    folder = work / f"n{n}"
    done = folder / "done"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-n // SHARD)
    width = len(img2dataset_key(shards - 1, SHARD - 1, SHARD))
    rows = np.arange(SHARD, dtype=np.int64)
    for s in range(shards):
        count = min(SHARD, n - s * SHARD)
        path = folder / f"{s:08d}.tar"
        with open(path, "wb") as f:
            f.truncate(count * 20 * 1024)  # sparse: an index is keyed by the shard's size and mtime only
        ids = s * 10 ** len(str(SHARD - 1)) + rows[:count]
        keys = np.char.zfill(ids.astype(f"S{width}"), width)
        offsets = 1536 * (rows[:count] + 1)
        save_index(ShardIndex(str(path), keys, ids, np.stack([offsets, np.full(count, 16000)], 1),
                              np.zeros(count, np.int8), np.stack([offsets + 16896, np.full(count, 40)], 1), {}))
    data_size = key_space([(s, min(SHARD, n - s * SHARD)) for s in range(shards)], SHARD)
    (folder / "dataset.yaml").write_text(f"num_samples: {n}\ndata_size: {data_size}\n")
    done.write_text(f"{shards}\n")
    return folder


def _measure(n: int, kind: str, work: Path) -> dict:
    """The pieces of one start (in this fresh process); `kind` "first" (no stored survey) or "later"."""

    folder = work / f"n{n}"
    if kind == "first":
        for stored in folder.glob(".neuclip-index/survey-*.npz"):
            stored.unlink()
    shards_n = int((folder / "done").read_text())
    out, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        out[name] = out.get(name, 0.0) + now - t
        t = now

    shards = [str(p) for p in expand_pattern(f"{folder}/{{00000000..{shards_n - 1:08d}}}.tar")]
    data_size, _ = data_size_of(shards)
    settings = {"data_size": data_size, "data_size_from": data_size_source(shards, data_size), "caption_limit": 1024}
    lap("list the shards, read dataset.yaml")
    timers = {"read every index": 0.0, "duplicate-id check": 0.0}
    real_index, real_check = check.shard_index, check._Seen.test_and_set

    def timed(name, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.perf_counter() - t0
        return call

    def before():  # what make_data runs when there is no stored survey
        lap("survey key (stat every shard and sidecar), no stored survey")
        assert all(index_is_fresh(s) for s in shards)
        lap("every index fresh? (each index's meta)")

    check.shard_index = timed("read every index", real_index)
    check._Seen.test_and_set = timed("duplicate-id check", real_check)
    sv = cached_survey(shards, before, **settings)  # as TrainData calls it
    check.shard_index, check._Seen.test_and_set = real_index, real_check
    if kind == "first":
        lap("survey, stored for later starts")
        out["survey, stored for later starts"] -= sum(timers.values())
        out.update(timers)
    else:
        lap(STORED)
    assert (STORED in out) == (kind == "later")
    assert int(sv.counts.sum()) == n and not sv.problems
    order = EpochOrder(sv.counts, seed=0, block=1 << 20)
    shard, nth = order.locate(0, 0, BATCH)
    lap(f"order: the first batch's {BATCH} positions")

    for s in np.unique(shard):
        index = shard_index(shards[s])
        index.image[nth[shard == s]]
    lap("first batch: the index of each shard it touches")
    out["resident memory at the first batch (GiB)"] = _resident_gib()
    out["peak resident memory (GiB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["shards touched by the first batch"] = int(len(np.unique(shard)))
    return out


def _resident_gib() -> float:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _child(n: int, kind: str, work: Path) -> dict:
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", "import time, sys; t = time.time(); from neuclip.bench.startup import main_measure; "
         "main_measure(t)", str(n), kind, str(work)], capture_output=True, text=True, check=False,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["python start"] = result.pop("_started") - t0
    return result


def main_measure(started: float) -> None:
    n, kind, work = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    import torch  # what the trainer imports before its data: part of every start  # noqa: F401


    imported = time.time()
    after_imports = _resident_gib()
    result = _measure(n, kind, work)
    result["resident memory after the imports (GiB)"] = after_imports
    result["_started"] = started
    result["imports (torch, neuclip)"] = imported - started
    print(json.dumps(result))


# -- the report --------------------------------------------------------------------------------------------

STORED = "survey key (stat every shard and sidecar) and the stored survey read"
_SECONDS = ["python start", "imports (torch, neuclip)", "list the shards, read dataset.yaml",
            "survey key (stat every shard and sidecar), no stored survey", "every index fresh? (each index's meta)",
            "read every index", "duplicate-id check", "survey, stored for later starts", STORED,
            f"order: the first batch's {BATCH} positions", "first batch: the index of each shard it touches"]


MEMORY = ["resident memory after the imports (GiB)", "resident memory at the first batch (GiB)",
          "peak resident memory (GiB)"]


def _fit(ns: list[int], values: list[float], target: int) -> float:
    """Linear in N through the two largest measurements (never below the largest measured)."""
    (n1, v1), (n2, v2) = sorted(zip(ns, values))[-2:]
    slope = max(0.0, (v2 - v1) / (n2 - n1))
    return v2 + slope * (target - n2)


def _markdown(args, rates, ns, runs) -> str:
    base = rates["tarfile (the scan it replaced)"]
    lines = [
        "## Start-up at a billion samples (`neuclip bench startup`)",
        "",
        f"Command: `{command_line()}` ({machine_line()}; {os.cpu_count()} cores).",
        "",
        f"Index scan, one core: {args.scan_shards} img2dataset-style shards of {SHARD:,} samples (a {args.image_kb} "
        "KiB .jpg, a .txt and img2dataset's .json each), the whole index built (headers, .txt and .json read, "
        "problems recorded), best of 3 alternating passes, CPU time:",
        "",
        "| scanner | samples/s per core | vs tarfile |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {rate:,.0f} | {rate / base:.2f}x |" for name, rate in rates.items()]
    fast = rates["TarScan (os.pread over the headers)"]
    lines += ["", "One-off cost of indexing when nothing is cached, at that rate: "]
    for name, target in TARGETS.items():
        hours = target / fast / 3600
        lines.append(f"- {name} ({target:.3g} samples): {hours:.1f} core-hours; {hours / args.ranks * 60:.0f} min on "
                     f"{args.ranks} ranks of one job or `neuclip data index --jobs {args.ranks}` (was "
                     f"{target / base / 3600:.1f} core-hours with tarfile).")
    keys = [k for k in _SECONDS if any(k in r for r in runs.values())]
    columns = {}  # label -> {piece: seconds or GiB}
    for n in ns:
        for kind in ("first", "later"):
            columns[f"{n:.0e} {kind}"] = runs[(n, kind)]
    for name, target in TARGETS.items():
        for kind in ("first", "later"):
            columns[f"{name} {kind}"] = {
                key: _fit(ns, [runs[(n, kind)][key] for n in ns], target)
                for key in keys + MEMORY if key in runs[(ns[-1], kind)]
            }
    for column in columns.values():
        column["total"] = sum(column.get(k, 0.0) for k in keys)
    lines += ["", f"A start at N samples in shards of {SHARD:,} (sparse stand-in tars, synthetic indexes; one process, "
              "wall-clock seconds; the last four columns extrapolated linearly from the two largest N):", "",
              "| piece | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for key in keys + ["total", *MEMORY]:
        cells = ["" if key not in c else f"{c[key]:.2f}" for c in columns.values()]
        lines.append(f"| {'**total**' if key == 'total' else key} | " + " | ".join(cells) + " |")
    for name in TARGETS:
        first, later = columns[f"{name} first"], columns[f"{name} later"]
        waiting = first["total"] + later.get(STORED, 0.0)  # the ranks that wait, then read it back
        lines += ["", f"{name} on {args.ranks} ranks, to the first batch: **{waiting / 60:.1f} min** at the first "
                  f"start on that data-set version from built indexes, **{later['total']:.0f} s** at a later one."]
    touched = runs[(ns[-1], "later")]["shards touched by the first batch"]
    lines += [
        "",
        f"Notes. \"first\": the first start on a data-set version (no stored survey): every rank checks every index's "
        "freshness, the first rank to take the survey's lock reads every index and checks every id, and stores the "
        f"survey; the other {args.ranks - 1} ranks of a {args.ranks}-rank job wait on that lock and then read it "
        "back, so the job's first step waits for about the \"first\" total plus a later start's stored survey "
        "read. \"later\": a resume, or another cell on the same data. The stand-in indexes were read from the "
        "page cache; on a parallel file system the index reads of a first start take longer (they are about 50 "
        "bytes a sample). "
        f"The first batch touched {touched} shards (block 2^20 samples of the shuffled shard order). Memory is "
        "the process's: the imports (torch) dominate it; what the start adds is the difference between the first "
        "two memory rows, mostly the duplicate check's bitmap (one bit per id: 175 MB at 1.4e9). Before the "
        "survey was stored, every start, resumes included, paid the \"first\" column.",
    ]
    return "\n".join(lines)


def run(args) -> int:
    work = Path(args.work)
    rates = _scan_rates(_scan_shards(work, args.scan_shards, args.image_kb))
    for name, rate in rates.items():
        print(f"{name}: {rate:,.0f} samples/s per core", flush=True)
    ns = sorted(int(float(x)) for x in args.samples.split(","))
    runs = {}
    for n in ns:
        t0 = time.perf_counter()
        _stand_in(work, n)
        print(f"N={n:.0e}: stand-in data ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for kind in ("first", "later"):
            runs[(n, kind)] = _child(n, kind, work)
            print(f"N={n:.0e} {kind}: {json.dumps(runs[(n, kind)])}", flush=True)
    publish(args, "startup", _markdown(args, rates, ns, runs))
    if args.plan_file:
        _write_plan_file(Path(args.plan_file), ns, runs, rates)
    return 0


def _write_plan_file(path: Path, ns: list[int], runs: dict, rates: dict) -> None:
    """The start's cost as fixed + per-sample seconds (the two largest N), read by `neuclip plan`."""
    import datetime

    import yaml


    fitted = {}
    for kind in ("first", "later"):
        totals = [sum(v for k, v in runs[(n, kind)].items() if k in _SECONDS) for n in ns]
        (n1, t1), (n2, t2) = sorted(zip(ns, totals))[-2:]
        per_sample = max(0.0, (t2 - t1) / (n2 - n1))
        fitted[kind] = {"seconds_fixed": round(t2 - per_sample * n2, 2),
                        "seconds_per_sample": float(f"{per_sample:.4g}")}
    info = {
        "measured_by": command_line(),
        "machine": machine_line(),
        "date": datetime.date.today().isoformat(),
        "samples_measured": ns,
        "first_start": fitted["first"],
        "later_start": fitted["later"],
        "index_scan_samples_per_second_per_core": round(rates["TarScan (os.pread over the headers)"]),
    }
    write_atomic(path, "# MEASURED by `neuclip bench startup` (see docs/benchmarks.md): the time from process start to "
                 "the first batch,\n# fixed + per-sample seconds; `neuclip plan` shows it per cell. Rerun it on your "
                 "cluster's file system.\n" + yaml.safe_dump(info, sort_keys=False))
