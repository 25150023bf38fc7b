"""What makes a sample or a shard bad: the one definition, used by `neuclip data check` and by the trainer.

A sample is bad when (`record_problems`, from the shard index, and `open_image`, when it is decoded):
- it has no image (.jpg/.jpeg/.png/.webp), no caption (.txt), a caption that is not UTF-8 or holds only
  whitespace, or a member twice;
- its id is unusable: no .json, a .json that does not parse or has no "key", a "key" that is not a
  non-negative integer (img2dataset writes zero-padded digit strings), or an id already held by an earlier
  sample (in shard-list order, then tar order: the first one is kept);
- its image does not decode (PIL; this is only found when the image is decoded).
A shard is bad when it cannot be read to the end (not a tar, truncated, corrupt header).
A shard is *fatal* when it is missing, or when its sample count disagrees with sizes.json beside it or with its
img2dataset `_stats.json`: the counts the workflow was planned with are then wrong.

Verdicts, the same in the checker and the trainer: a bad sample or shard is an error naming the shard and the
key; with skip_bad (`--skip-bad`, `data.skip_bad`) it is skipped and counted. Fatal problems always stop.
The trainer's epoch is the set of usable samples this finds (`survey`), never a count from sizes.json.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neuclip.data.index import ShardIndex, shard_index
from neuclip.data.keys import data_size_of, data_size_source
from neuclip.data.samples import IMAGE_EXTS, image_ext, parse_id, record_problems  # noqa: F401 - re-exported
from neuclip.data.shards import ShardError, expand_pattern

SAMPLE_FIX = "re-download or drop those samples, or set skip_bad (--skip-bad, data.skip_bad=true) to skip them"
ID_FIX = "correct its key (.json / __key__), or raise data_size to max id + 1 (the size of per-sample state)"
SHARD_FIX = "regenerate or re-download this shard, or remove it from the pattern and from sizes.json"


class DataError(RuntimeError):
    """A bad shard or sample met by the trainer; the message names the shard and key."""


class BadImage(ValueError):
    pass


# -- samples --------------------------------------------------------------------------------------------


def open_image(data: bytes, ext: str):
    """The decoded RGB PIL image, or BadImage with the reason: the one decodability rule."""
    from PIL import Image, ImageFile

    no_check = (Image.Image.verify, ImageFile.ImageFile.verify)  # JPEG/WebP: verify() checks nothing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if type(im).verify not in no_check:  # PNG's checks its chunk CRCs
                im.verify()
                im = Image.open(io.BytesIO(data))
            im.load()  # pixel data: catches truncation that verify() lets through
            return im if im.mode == "RGB" else im.convert("RGB")
    except Exception as err:  # PIL raises many types for bad bytes
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # no addresses in reports
        raise BadImage(f"image .{ext} does not decode ({type(err).__name__}: {message})") from None


# -- shards and the data set ----------------------------------------------------------------------------


@dataclass
class Problem:
    shard: str
    key: str | None  # None for a problem with the whole shard
    reason: str
    kind: str = "sample"  # "sample" | "shard" (both skippable) | "fatal"

    @property
    def fatal(self) -> bool:
        return self.kind == "fatal"

    def __str__(self) -> str:
        where = f"{self.shard}" if self.key is None else f"{self.shard}: sample {self.key}"
        return f"{where}: {self.reason}"

    def named(self) -> str:
        """The trainer's wording: shard {path} key {key}: reason."""
        where = f"shard {self.shard}" + ("" if self.key is None else f" key {self.key}")
        return f"{where}: {self.reason}"


@dataclass
class Survey:
    """The usable samples of a shard list and every problem found without decoding images."""

    shards: list[str]
    samples: list[int | None]  # samples in each shard's tar (None: unreadable)
    usable: list[np.ndarray | None]  # positions of usable samples per shard; None = all (or unreadable)
    counts: np.ndarray  # usable samples per shard
    problems: list[Problem] = field(default_factory=list)
    max_id: int = -1
    captions_over: int = 0  # usable samples whose caption is longer than survey's caption_limit (bytes)


def _expected_counts(path: Path, sizes_cache: dict) -> list[tuple[str, int | None]]:
    """(source, count) pairs the shard should match: sizes.json beside it, and its img2dataset stats."""
    folder = path.parent
    if folder not in sizes_cache:
        sizes_file = folder / "sizes.json"
        sizes_cache[folder] = json.loads(sizes_file.read_text()) if sizes_file.exists() else None
    expected = []
    if sizes_cache[folder] is not None:
        sizes = sizes_cache[folder]
        expected.append((str(folder / "sizes.json"), sizes.get(path.name, sizes.get(path.stem))))
    stats = path.with_name(path.name.split(".")[0] + "_stats.json")
    if stats.exists():
        successes = json.loads(stats.read_text()).get("successes")
        if successes is not None:  # img2dataset counts written samples as successes
            expected.append((str(stats), successes))
    return expected


def count_problems(path: Path, samples: int, sizes_cache: dict) -> list[str]:
    """Disagreements of the shard's real sample count with sizes.json / _stats.json (always fatal)."""
    try:
        expected = _expected_counts(path, sizes_cache)
    except (OSError, ValueError) as err:
        return [f"cannot read sizes.json or _stats.json beside it ({err}): regenerate them"]
    out = []
    for source, count in expected:
        if count is None:
            out.append(f"not listed in {source}: add it, or regenerate {Path(source).name}")
        elif int(count) != samples:
            out.append(f"{source} says {count} samples but the shard has {samples}: {SHARD_FIX}")
    return out


class _Seen:
    """The ids seen so far, for the duplicate check: a bitmap (one bit per id: 175 MB for 1.4e9 ids) up to a cap
    that grows with the number of ids seen (64 bits each, at least 2^20), and a set for the few ids above it. So
    memory follows the samples, never the largest id (one key of 10^12 asked for a 116 GiB bitmap)."""

    def __init__(self):
        self.bits = np.zeros(1 << 16, dtype=np.uint8)
        self.count = 0
        self.outliers: set[int] = set()

    def test_and_set(self, ids: np.ndarray) -> np.ndarray:
        self.count += len(ids)
        cap = max(1 << 20, 64 * self.count)
        dense = ids < cap
        before = np.zeros(len(ids), dtype=bool)
        inside = ids[dense]
        need = int(inside.max()) // 8 + 1 if len(inside) else 0
        if need > len(self.bits):
            self.bits = np.concatenate([self.bits, np.zeros(max(need, 2 * len(self.bits)) - len(self.bits), np.uint8)])
        byte, bit = inside >> 3, (1 << (inside & 7)).astype(np.uint8)
        before[dense] = (self.bits[byte] & bit) != 0
        np.bitwise_or.at(self.bits, byte, bit)
        for i in np.flatnonzero(~dense):
            before[i] = int(ids[i]) in self.outliers
            self.outliers.add(int(ids[i]))
        _, first = np.unique(ids, return_index=True)
        repeat = np.ones(len(ids), dtype=bool)
        repeat[first] = False  # a second occurrence inside this shard
        return before | repeat


def survey(paths: Iterable[str | Path], need_ids: bool = True, on_index=None, data_size: int | None = None,
           data_size_from: str = "data_size", caption_limit: int | None = None) -> Survey:
    """Index every shard (cached), apply the bad-sample definition and the duplicate-id and count checks.

    `on_index(shard_number, ShardIndex)` sees each readable shard's index (the checker decodes from it). With
    `data_size` (the id space: max id + 1, from `data_size_from`), a sample whose id is at or above it is a bad
    sample, named (`data_size_from` says where the value came from, e.g. "data_size 216 (from dataset.yaml)"):
    `neuclip data check` and `neuclip train` give it the same verdict. With `caption_limit`, the usable samples
    whose caption (the .txt size in the index) is longer than that many bytes are counted (`captions_over`).
    """
    shards = [str(p) for p in paths]
    sv = Survey(shards, [], [], np.zeros(len(shards), dtype=np.int64))
    seen, sizes_cache, duplicates = _Seen(), {}, []
    for s, shard in enumerate(shards):
        path = Path(shard)
        try:
            index = shard_index(path)
        except ShardError as err:
            kind = "fatal" if not path.exists() else "shard"
            sv.samples.append(None)
            sv.usable.append(None)
            sv.problems.append(Problem(shard, None, f"{err}: {SHARD_FIX}", kind))
            continue
        sv.samples.append(len(index))
        sv.problems += [Problem(shard, None, r, "fatal") for r in count_problems(path, len(index), sizes_cache)]
        bad = np.zeros(len(index), dtype=bool)
        for i, found in sorted(index.problems.items()):
            reasons = [r for kind, r in found if need_ids or kind != "id"]
            sv.problems += [Problem(shard, index.key(i), r) for r in reasons]
            bad[i] = bool(reasons)
        if need_ids:
            valid = np.flatnonzero(index.ids >= 0)
            if data_size is not None:
                over = valid[index.ids[valid] >= data_size]
                for i in over:
                    sv.problems.append(Problem(shard, index.key(int(i)),
                                               f"sample id {int(index.ids[i])} >= {data_size_from}: {ID_FIX}"))
                bad[over] = True
                valid = valid[index.ids[valid] < data_size]
            if len(valid):
                dup = valid[seen.test_and_set(index.ids[valid])]
                duplicates += [(s, int(i)) for i in dup]
                bad[dup] = True
                sv.max_id = max(sv.max_id, int(index.ids[valid].max()))
        sv.usable.append(np.flatnonzero(~bad) if bad.any() else None)
        sv.counts[s] = len(index) - int(bad.sum())
        if caption_limit:
            sv.captions_over += int((index.text[~bad, 1] > caption_limit).sum())
        if on_index is not None:
            on_index(s, index)
    if duplicates:
        sv.problems += _duplicate_problems(sv, duplicates)
    return sv


def _duplicate_problems(sv: Survey, duplicates: list[tuple[int, int]]) -> list[Problem]:
    """Name, for each repeated id, where it was first seen (a second pass, only when there are repeats)."""
    wanted: dict[int, None | tuple[str, str]] = {}
    dup_at = {}
    for s, i in duplicates:
        index = shard_index(sv.shards[s])
        dup_at[(s, i)] = (index.key(i), int(index.ids[i]))
        wanted.setdefault(int(index.ids[i]), None)
    duplicate_set = set(duplicates)
    for s, shard in enumerate(sv.shards):
        if sv.samples[s] is None or all(v is not None for v in wanted.values()):
            continue
        index = shard_index(shard)
        for i in np.flatnonzero(np.isin(index.ids, list(wanted))):
            if wanted[int(index.ids[i])] is None and (s, int(i)) not in duplicate_set:
                wanted[int(index.ids[i])] = (shard, index.key(int(i)))
    out = []
    for (s, _), (key, sample_id) in dup_at.items():
        first_shard, first_key = wanted[sample_id]
        out.append(Problem(sv.shards[s], key, f"duplicate id {sample_id}: also in {first_shard} (key {first_key})"))
    return out


# -- the checker ----------------------------------------------------------------------------------------


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


def _decode_all(index: ShardIndex, shard: str) -> list[Problem]:
    out = []
    with open(shard, "rb") as f:
        for i in np.flatnonzero(index.image_ext >= 0):
            offset, size = index.image[i]
            f.seek(int(offset))
            try:
                open_image(f.read(int(size)), IMAGE_EXTS[index.image_ext[i]])
            except BadImage as err:
                out.append(Problem(shard, index.key(int(i)), str(err)))
    return out


def check_shards(pattern: str, skip_bad: bool = False, need_ids: bool = True, data_size: int | None = None) -> Report:
    """Every problem of the shards matching `pattern` (see the module docstring); images are all decoded.
    `need_ids=False` for sets without sample ids (clip_benchmark eval sets): no .json/key/duplicate checks."""
    report = Report(skip_bad)
    paths = expand_pattern(pattern)
    if not paths:
        report.problems.append(Problem(str(pattern), None, "matches no shards: check the path or pattern", "fatal"))
        return report
    size, source = None, ""
    if need_ids:
        names = list(map(str, paths))
        try:  # the trainer's default id space: dataset.yaml beside the shards, else max id + 1 (sanity-checked)
            size = data_size if data_size is not None else data_size_of(names)[0]
        except ValueError as err:
            report.problems.append(Problem(str(pattern), None, str(err), "fatal"))
            return report
        source = data_size_source(names, size)
    decoded: list[Problem] = []
    sv = survey(paths, need_ids, on_index=lambda s, index: decoded.extend(_decode_all(index, str(paths[s]))),
                data_size=size, data_size_from=source)
    order = {shard: s for s, shard in enumerate(sv.shards)}
    report.problems = sorted(sv.problems + decoded, key=lambda p: (order[p.shard], p.key is not None, p.key or ""))
    for s, shard in enumerate(sv.shards):
        mine = [p for p in report.problems if p.shard == shard]
        whole = [p for p in mine if p.key is None]
        report.shards.append(
            ShardSummary(
                shard,
                samples=sv.samples[s] or 0,
                bad=len({p.key for p in mine if p.key is not None}),
                bytes=Path(shard).stat().st_size if Path(shard).is_file() else 0,
                error=whole[0].reason.split(": ")[0] if whole else None,
            )
        )
    return report


def format_report(report: Report) -> str:
    lines = [report.table()]
    samples = [p for p in report.problems if not p.fatal]
    fatal = [p for p in report.problems if p.fatal]
    if samples:
        verb = "skipping" if report.skip_bad else "bad"
        lines += [""] + [f"{verb}: {p}" for p in samples]
        if not report.skip_bad:
            lines.append(f"{len(samples)} bad sample(s)/shard(s): {SAMPLE_FIX}")
    if fatal:
        lines += [""] + [f"ERROR: {p}" for p in fatal]
        if report.skip_bad:
            lines.append("missing shards and count mismatches are never skipped: fix or remove those shards")
    lines.append("OK" if report.ok else "FAILED")
    return "\n".join(lines)
