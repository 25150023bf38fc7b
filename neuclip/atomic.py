"""One way to write an artefact: a temp file in the same folder, fsync, rename (and fsync the folder).

A crashed or killed job therefore never leaves a file that looks finished: Snakemake, the report and a
resumed run see either the old file or the whole new one. Every file the harness tracks goes through here.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: done once, at import
    os.umask(mask)
    return mask


# What open() and mkdir() would give: mkstemp's and mkdtemp's own 0o600/0o700 would hide run folders from
# the other users of a shared cluster.
FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call `write(f)` on a temp file beside `path`, then atomically rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(err):  # torch.save wraps it in "unexpected pos": name the cause and the file
            raise OSError(errno.ENOSPC, f"No space left on device writing {path}", str(path)) from err
        raise
    _fsync_dir(path.parent)
    return path


def disk_full(err: BaseException | None) -> bool:
    """Whether ENOSPC is anywhere in the exception's chain (its cause or the exception it was raised during)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__cause__ or err.__context__
    return False


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text or bytes to `path` atomically."""
    return write_with(path, lambda f: f.write(data), binary=isinstance(data, bytes))


def write_json(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    """Write `obj` as JSON (plus a final newline) to `path` atomically."""
    return write_atomic(path, json.dumps(obj, indent=indent) + "\n")
