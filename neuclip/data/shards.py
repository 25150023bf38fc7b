"""The one tar-shard reader: the header scan, raw samples, and member reads by offset.

Shards follow webdataset's convention: a sample is a run of consecutive members sharing a key (the member
name up to its first dot), e.g. `000000123.jpg`, `000000123.txt`, `000000123.json`; a member without an
extension is ignored, as webdataset ignores it. Everything that reads shards goes through here: the per-shard
index (neuclip/data/index.py, which the training loader and the checker read), the error pass
(`iter_samples`), the generator (`write_tar`), and the eval code (`IMAGE_EXTS`). What makes a sample *bad* is
decided in neuclip/data/check.py. img2dataset's sidecars (`NNNNN_stats.json`, `NNNNN.parquet`) are not shards
and not read.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import braceexpand

from neuclip.data.samples import IMAGE_EXTS  # noqa: F401 - re-exported: the eval code reads it here

BLOCK = 512
INDEX_VERSION = 1
INDEX_DIR = ".neuclip-index"
_SPLIT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


class ShardError(Exception):
    """A shard that cannot be read to the end (missing, not a tar, truncated, corrupt header)."""


def key_width(num_samples: int) -> int:
    """Digits in a sample key: 9 like img2dataset, more only when the ids need them."""
    return max(9, len(str(max(num_samples - 1, 0))))


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write samples to `path` so the same input gives byte-identical files.

    Members are written in key order then extension order, with mtime/uid/gid/owner fixed: tar headers are
    the only place a timestamp or user name could leak in. Written to a temp name and renamed, so a crash
    never leaves a shard that looks finished. Returns the number of samples.
    """
    tmp = path.with_name(path.name + ".partial")
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, fields in samples:
            for ext in sorted(fields):
                data = fields[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
            count += 1
    os.replace(tmp, path)
    return count


def expand_pattern(pattern: str | os.PathLike) -> list[Path]:
    """Shard paths named by a brace pattern (`d/{00000..00003}.tar`), a glob, a directory, or `a::b`."""
    paths: list[Path] = []
    for part in str(pattern).split("::"):
        for item in braceexpand.braceexpand(part):
            if os.path.isdir(item):
                paths += sorted(Path(item).glob("*.tar"))
            elif glob.has_magic(item):
                paths += [Path(p) for p in sorted(glob.glob(item))]
            else:
                paths.append(Path(item))
    return paths


_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES less GNU sparse, which no shard writer emits
_NOT_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: tarfile reads no data blocks
_PAX = (b"x", b"g", b"X")
_POSIX_MAGIC = b"ustar\x0000"
_WINDOW = 1 << 16  # bytes per pread: a header, the small members after it, and often the next header


def _number(field: bytes) -> int:
    """A numeric header field as tarfile's nti reads it: octal text, or GNU base-256 (first byte 0x80/0xff)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    text = field.split(b"\0", 1)[0].strip()
    if text and not text.isdigit():  # isdigit also passes 8 and 9: int() below refuses them
        raise ValueError
    return int(text or b"0", 8)


# mode, uid, gid, mtime, devmajor, devminor: checked, never used. The pattern is what writers put there (digits,
# leading spaces, a NUL or trailing spaces), all of it valid for tarfile; anything else takes the exact path.
_OTHER_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
_PLAIN_NUMBER = re.compile(rb" *[0-7]*(?:\0[\s\S]*| *)")


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """The records of a pax header ("LEN key=value\\n"), as tarfile's _proc_pax reads them."""
    records, pos = {}, 0
    while (match := _PAX_RECORD.match(data, pos)) is not None:
        length = int(match.group(1))
        if length == 0:
            raise ValueError("zero-length pax record")
        value = data[match.end(2) + 1 : match.start(1) + length - 1]
        records[match.group(2).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


class TarScan:
    """The members of one tar, read from its headers with os.pread over 512-byte blocks.

    It accepts what tarfile accepts and refuses what it refuses (the header checksum, signed or unsigned, and
    every numeric field; ustar prefixes, GNU long names, pax path/size records, global ones included), but
    builds no TarInfo objects and decodes only the fields an index needs (the name, type and size): a whole
    index builds at 2.3x tarfile's samples/s per core here (`neuclip bench startup`, docs/benchmarks.md).
    tests/test_tar_scan.py holds it to neuclip/data/tar_reference.py, the tarfile scan it replaced, on every
    damaged-shard case. Also required: the end-of-archive marker (two zero blocks) that every tar writer
    emits, because tarfile alone stops silently at a corrupt or half-written header.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError("file not found") from None
        except OSError as err:
            raise ShardError(f"cannot open ({err})") from None
        self.size = os.fstat(self.fd).st_size
        self.buf, self.at = b"", 0

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> TarScan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` (fewer at the end of the file), from the window when they lie in it."""
        start = offset - self.at
        if start < 0 or start + size > len(self.buf):
            self.buf, self.at, start = os.pread(self.fd, max(size, _WINDOW), offset), offset, 0
        return self.buf[start : start + size]

    def _header(self, pos: int) -> bytes | None:
        """The header block at `pos`, checked; None at the end-of-archive marker."""
        block = self.read(pos, BLOCK)
        if len(block) < BLOCK:
            if pos == 0:
                raise ShardError("not a readable tar (empty file)" if not block else "not a readable tar (too short)")
            raise ShardError(f"truncated or corrupt after byte {pos} (no end-of-archive marker)")
        if not block.strip(b"\0"):
            if self.read(pos, 2 * BLOCK).strip(b"\0") or len(self.read(pos, 2 * BLOCK)) < 2 * BLOCK:
                raise ShardError(f"truncated or corrupt after byte {pos} (no end-of-archive marker)")
            return None
        try:
            stored = _number(block[148:156])
            for start, end in _OTHER_NUMBERS:  # tarfile refuses a header with any unreadable number
                if _PLAIN_NUMBER.fullmatch(block, start, end) is None:
                    _number(block[start:end])
        except ValueError:
            stored = None
        unsigned = 256 + sum(block) - sum(block[148:156])
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in block[:148] + block[156:]):
            if pos == 0:
                raise ShardError("not a readable tar (bad header checksum)")
            raise ShardError(f"truncated or corrupt after byte {pos} (no end-of-archive marker)")
        return block

    def members(self) -> Iterator[tuple[str, str, int, int]]:
        """(key, ext, data offset, size) of each regular member, in tar order; raises ShardError."""
        pos, global_pax, long_name, pax = 0, {}, None, None
        while (block := self._header(pos)) is not None:
            kind, data_at = block[156:157], pos + BLOCK
            size = _number(block[124:136])
            if kind in (b"L", b"K") or kind in _PAX:
                data = self.read(data_at, size)
                if len(data) < size:
                    raise ShardError(f"corrupt tar after byte {pos} (truncated extended header)")
                if kind == b"L":
                    long_name = _text(data)
                elif kind in _PAX:
                    try:
                        records = _pax_records(data)
                    except ValueError as err:
                        raise ShardError(f"corrupt tar after byte {pos} ({err})") from None
                    if kind == b"g":
                        global_pax.update(records)
                    else:
                        pax = records
                pos = data_at + -(-size // BLOCK) * BLOCK
                continue
            if (block[257:265] == _POSIX_MAGIC) and (prefix := _text(block[345:500])):
                name = prefix + "/" + _text(block[0:100])
            else:
                name = _text(block[0:100])
            if long_name is not None:
                name = long_name
            path = (pax or {}).get("path", global_pax.get("path"))  # a global pax size moves no offset: ignored
            if path is not None:
                name = path.rstrip("/")
            if pax and "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    size = 0
            long_name = pax = None
            if kind == b"S":
                raise ShardError(f"member {name!r} is a GNU sparse file: rewrite the shard without sparse members")
            v7_dir = kind == b"\0" and _text(block[0:100]).endswith("/")  # old tars: a directory, as in tarfile
            regular = kind in _REGULAR and not v7_dir
            if regular or kind not in _NOT_SKIPPED:  # tarfile skips the data of files and of unknown types
                pos = data_at + -(-size // BLOCK) * BLOCK
            else:
                pos = data_at
            if not regular:
                continue
            if data_at + size > self.size:
                raise ShardError(f"truncated inside member {name!r}")
            match = _SPLIT.match(name)
            if match is not None:
                yield match.group(1), match.group(2), data_at, size


def scan_members(path: str | os.PathLike) -> Iterator[tuple[str, str, int, int]]:
    """(key, ext, data offset, size) of each regular member, from the headers only (see TarScan).

    Raises ShardError when the file is missing, not a tar, or cut/corrupt anywhere."""
    with TarScan(path) as scan:
        yield from scan.members()


def _grouped(scan: TarScan) -> Iterator[tuple[str, dict[str, tuple[int, int]], list[str]]]:
    """(key, {ext: (offset, size)}, repeated member names) per sample: consecutive members sharing a key."""
    key, members, repeated = None, {}, []
    for k, ext, offset, size in scan.members():
        if k != key:
            if key is not None:
                yield key, members, repeated
            key, members, repeated = k, {}, []
        if ext in members:
            repeated.append(f"{k}.{ext}")
            continue
        members[ext] = (offset, size)
    if key is not None:
        yield key, members, repeated


def iter_samples(path: Path) -> Iterator[dict]:
    """webdataset-style raw samples (`__key__`, `__url__`, ext -> bytes) of one shard; raises ShardError."""
    with TarScan(path) as scan:
        for key, members, _ in _grouped(scan):
            sample = {"__key__": key, "__url__": str(path)}
            for ext, (offset, size) in members.items():
                sample[ext] = scan.read(offset, size)
            yield sample


class MemberReader:
    """Reads members of shards by offset, keeping a few files open (each worker process has its own)."""

    def __init__(self, max_open: int = 16):
        self.max_open, self.files = max_open, {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        f = self.files.pop(path, None)
        if f is None:
            f = open(path, "rb")  # noqa: SIM115 - cached, closed on eviction
            if len(self.files) >= self.max_open:
                self.files.pop(next(iter(self.files))).close()
        self.files[path] = f  # most recently used last
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ShardError(f"{path}: member at byte {offset} truncated ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
