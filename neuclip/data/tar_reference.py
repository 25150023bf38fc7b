"""The tarfile-based header scan that neuclip/data/shards.py's TarScan replaced, kept as its reference.

tests/test_tar_scan.py holds TarScan to this on every damaged-shard case (same members and the same index, or a
ShardError where this raises one), and `neuclip bench startup` times both side by side. Nothing else should call
it: it builds a TarInfo per member and is several times slower.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from neuclip.data.shards import _SPLIT, BLOCK, ShardError


def scan_members(path: str | os.PathLike) -> Iterator[tuple[str, str, int, int]]:
    """(key, ext, data offset, size) of each regular member, from tarfile's headers; raises ShardError when the
    file is missing, not a tar, or cut/corrupt (tarfile stops silently at a corrupt header, so the
    end-of-archive marker is required after the last member)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise ShardError("file not found") from None
    except OSError as err:
        raise ShardError(f"cannot open ({err})") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError) as err:
            raise ShardError(f"not a readable tar ({err})") from None
        end = 0
        try:
            while (info := tf.next()) is not None:
                tf.members.clear()  # tarfile keeps every header otherwise; we only stream
                end = info.offset_data + -(-info.size // BLOCK) * BLOCK
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    raise ShardError(f"truncated inside member {info.name!r}")
                match = _SPLIT.match(info.name)
                if match is not None:
                    yield match.group(1), match.group(2), info.offset_data, info.size
        except (tarfile.TarError, EOFError) as err:
            raise ShardError(f"corrupt tar after byte {end} ({err})") from None
        f.seek(end)
        marker = f.read(2 * BLOCK)
    if len(marker) < 2 * BLOCK or marker.strip(b"\0"):
        raise ShardError(f"truncated or corrupt after byte {end} (no end-of-archive marker)")


class TarfileScan:
    """TarScan's interface (members, read) over the tarfile scan, so `build_index(path, TarfileScan)` builds the
    index the way it was built before TarScan."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = open(self.path, "rb")  # noqa: SIM115 - closed in close()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> TarfileScan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def members(self) -> Iterator[tuple[str, str, int, int]]:
        return scan_members(self.path)

    def read(self, offset: int, size: int) -> bytes:
        self.file.seek(offset)
        return self.file.read(size)
