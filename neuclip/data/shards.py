"""Tar shard I/O shared by the generator, the checker and the training loader.

Shards follow webdataset's convention: a sample is a run of consecutive members sharing a key (the member
name up to its first dot), e.g. `000000123.jpg`, `000000123.txt`, `000000123.json`.
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

BLOCK = 512


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


class ShardError(Exception):
    """A shard that cannot be read to the end (missing, not a tar, truncated)."""


_SPLIT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


def iter_samples(path: Path) -> Iterator[dict]:
    """Yield webdataset-style raw samples (`__key__`, `__url__`, ext -> bytes) from one shard.

    Raises ShardError when the file is missing, not a tar, or truncated. tarfile alone stops silently at a
    header cut in half, so after the last member we also require the end-of-archive marker (two zero
    blocks) that every tar writer emits.
    """
    try:
        size = path.stat().st_size
        tf = tarfile.open(path, "r:")
    except FileNotFoundError:
        raise ShardError("file not found") from None
    except (tarfile.TarError, OSError) as err:
        raise ShardError(f"not a readable tar ({err})") from None
    with tf:
        sample: dict | None = None
        end = 0
        try:
            for member in tf:
                end = member.offset_data + -(-member.size // BLOCK) * BLOCK
                if not member.isfile():
                    continue
                match = _SPLIT.match(member.name)
                if match is None:
                    raise ShardError(f"member {member.name!r} has no extension (expected KEY.EXT)")
                key, ext = match.groups()
                if end > size:
                    raise ShardError(f"truncated inside member {member.name!r}")
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": str(path)}
                if ext in sample:
                    raise ShardError(f"member {member.name!r} appears twice in one sample")
                sample[ext] = tf.extractfile(member).read()
        except tarfile.TarError as err:
            raise ShardError(f"corrupt tar ({err})") from None
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(2 * BLOCK)
        if len(marker) < 2 * BLOCK or marker.strip(b"\0"):
            raise ShardError(f"truncated or corrupt after byte {end} (no end-of-archive marker)")
        if sample is not None:
            yield sample
