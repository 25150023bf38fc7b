"""Validate image-text tar shards before a long run trips over them.

Two kinds of problem:
- sample problems (image does not decode, caption missing or empty, key not an integer, key seen before):
  `--skip-bad` lists them and exits 0, and a training loader configured to skip drops exactly these, via
  `sample_problems` / `drop_bad`;
- shard problems (file missing, not a tar, truncated, sample count disagreeing with sizes.json or the
  img2dataset `_stats.json`): always fatal, even with `--skip-bad`, because the epoch length and the sample
  ids the run would record are then wrong. Regenerate or re-download the shard, or remove it from the
  pattern and from sizes.json.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from neuclip.data.shards import ShardError, expand_pattern, iter_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SAMPLE_FIX = (
    "re-download or drop those samples, or rerun with --skip-bad to list what would be skipped "
    "(a training loader set to skip bad samples drops the same ones, via drop_bad)"
)
SHARD_FIX = "regenerate or re-download this shard, or remove it from the pattern and from sizes.json"


def _image_problem(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.verify()  # structure and checksums
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # pixel data: catches truncation that verify() lets through
    except Exception as err:  # PIL raises many types for bad bytes
        return f"{type(err).__name__}: {err}"
    return None


def sample_problems(sample: dict) -> list[str]:
    """Why a raw webdataset sample (`__key__` plus ext -> bytes) is unusable for image-text training."""
    problems = []
    key = sample["__key__"]
    if not key.isdigit():
        problems.append(f"key {key!r} is not an integer (img2dataset keys are zero-padded integers)")
    images = [ext for ext in IMAGE_EXTS if ext in sample]
    if not images:
        problems.append(f"no image (expected one of .{', .'.join(IMAGE_EXTS)}; has {_exts(sample)})")
    for ext in images:
        reason = _image_problem(sample[ext])
        if reason:
            problems.append(f"image .{ext} does not decode ({reason})")
    if "txt" not in sample:
        problems.append(f"no caption (.txt missing; has {_exts(sample)})")
    else:
        try:
            if not sample["txt"].decode("utf-8").strip():
                problems.append("empty caption (.txt)")
        except UnicodeDecodeError:
            problems.append("caption (.txt) is not UTF-8")
    if "json" in sample:
        try:
            json.loads(sample["json"])
        except ValueError:
            problems.append(".json does not parse")
    return problems


def _exts(sample: dict) -> str:
    return ", ".join("." + k for k in sample if not k.startswith("__")) or "nothing"


def drop_bad(samples: Iterable[dict], on_bad: Callable[[dict, list[str]], None] | None = None) -> Iterator[dict]:
    """Filter for a webdataset pipeline (`.compose(drop_bad)`): pass good samples, report and drop the rest.

    Duplicate keys are caught within the stream this sees (one worker's shards).
    """
    seen: set[str] = set()
    for sample in samples:
        problems = sample_problems(sample)
        if sample["__key__"] in seen:
            problems.append(f"duplicate key {sample['__key__']}")
        seen.add(sample["__key__"])
        if problems:
            if on_bad is not None:
                on_bad(sample, problems)
            continue
        yield sample


@dataclass
class Problem:
    shard: str
    key: str | None  # None for a problem with the whole shard
    reason: str

    @property
    def fatal(self) -> bool:
        return self.key is None

    def __str__(self) -> str:
        where = f"{self.shard}" if self.key is None else f"{self.shard}: sample {self.key}"
        return f"{where}: {self.reason}"


@dataclass
class ShardSummary:
    path: str
    samples: int = 0
    bad: int = 0
    bytes: int = 0
    error: str | None = None


@dataclass
class Report:
    skip_bad: bool
    shards: list[ShardSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.fatal or not self.skip_bad for p in self.problems)

    def table(self) -> str:
        width = max([len(s.path) for s in self.shards] + [len("shard")])
        lines = [f"{'shard':<{width}}  {'samples':>8}  {'bad':>6}  {'bytes':>12}  status"]
        for s in self.shards:
            status = f"ERROR: {s.error}" if s.error else "ok"
            lines.append(f"{s.path:<{width}}  {s.samples:>8}  {s.bad:>6}  {s.bytes:>12}  {status}")
        total = f"total ({len(self.shards)} shards)"
        samples, bad = sum(s.samples for s in self.shards), sum(s.bad for s in self.shards)
        nbytes = sum(s.bytes for s in self.shards)
        lines.append(f"{total:<{width}}  {samples:>8}  {bad:>6}  {nbytes:>12}")
        return "\n".join(lines)


def _expected_counts(path: Path, sizes_cache: dict) -> list[tuple[str, int | None]]:
    """(source, count) pairs the shard should match: sizes.json beside it, and its img2dataset stats."""
    folder = path.parent
    if folder not in sizes_cache:
        sizes_file = folder / "sizes.json"
        sizes_cache[folder] = json.loads(sizes_file.read_text()) if sizes_file.exists() else None
    expected = []
    if sizes_cache[folder] is not None:
        expected.append((str(folder / "sizes.json"), sizes_cache[folder].get(path.name)))
    stats = path.with_name(path.name.split(".")[0] + "_stats.json")
    if stats.exists():
        successes = json.loads(stats.read_text()).get("successes")
        if successes is not None:  # img2dataset counts written samples as successes
            expected.append((str(stats), successes))
    return expected


def check_shards(pattern: str, skip_bad: bool = False) -> Report:
    """Read every shard matching `pattern` to the end; see the module docstring for what is checked."""
    report = Report(skip_bad)
    paths = expand_pattern(pattern)
    if not paths:
        report.problems.append(Problem(str(pattern), None, "matches no shards: check the path or pattern"))
        return report
    first_seen: dict[str, str] = {}  # key -> shard it first appeared in
    sizes_cache: dict = {}
    for path in paths:
        summary = ShardSummary(str(path))
        report.shards.append(summary)

        def add(key, reason, summary=summary):
            report.problems.append(Problem(summary.path, key, reason))

        summary.bytes = path.stat().st_size if path.is_file() else 0
        try:
            for sample in iter_samples(path):
                summary.samples += 1
                key = sample["__key__"]
                reasons = sample_problems(sample)
                if key in first_seen:
                    reasons.append(f"duplicate key: also in {first_seen[key]}")
                first_seen.setdefault(key, summary.path)
                summary.bad += bool(reasons)
                for reason in reasons:
                    add(key, reason)
        except (ShardError, OSError) as err:
            summary.error = str(err)
            add(None, f"{err}: {SHARD_FIX}")
            continue
        try:
            expected = _expected_counts(path, sizes_cache)
        except (OSError, ValueError) as err:
            summary.error = "unreadable sizes/stats"
            add(None, f"cannot read sizes.json or stats beside it ({err}): regenerate them")
            continue
        for source, count in expected:
            if count is None:
                summary.error = f"not in {Path(source).name}"
                add(None, f"not listed in {source}: add it, or regenerate {Path(source).name}")
            elif int(count) != summary.samples:
                summary.error = "count mismatch"
                add(None, f"{source} says {count} samples but the shard has {summary.samples}: {SHARD_FIX}")
    return report


def format_report(report: Report) -> str:
    lines = [report.table()]
    samples = [p for p in report.problems if not p.fatal]
    shards = [p for p in report.problems if p.fatal]
    if samples:
        verb = "skipping" if report.skip_bad else "bad sample"
        lines += [""] + [f"{verb}: {p}" for p in samples]
        if not report.skip_bad:
            lines.append(f"{len(samples)} problem(s) in samples: {SAMPLE_FIX}")
    if shards:
        lines += [""] + [f"ERROR: {p}" for p in shards]
        if report.skip_bad:
            lines.append("whole-shard errors are not skippable: fix or remove those shards")
    lines.append("OK" if report.ok else "FAILED")
    return "\n".join(lines)
