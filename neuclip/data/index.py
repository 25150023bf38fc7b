"""The per-shard index: made where the data is made, read at every start, and built under a lock otherwise.

The index of a shard holds, per sample, its key, id (the .json "key"), the offsets of its image and caption
members and the problems found without decoding the image (neuclip/data/samples.py). Building it reads the tar
headers and the small .txt/.json members once (neuclip/data/shards.py's TarScan). It is stored as
`.neuclip-index/<shard>.npz` beside the shards or, where that folder is read-only, under $NEUCLIP_INDEX_CACHE
(default ~/.cache/neuclip/index), and is stale when the shard's size or mtime changes.

Who builds it: `neuclip data synth` and `neuclip data download` as each shard is finished, `neuclip data index`
for shards that came from elsewhere (over --jobs processes, resumable), and otherwise the first start that
needs it. Several processes that need the same indexes at once (the ranks of a job, or the cells of a grid
starting together) share the work: a shard's index is built under a POSIX byte-range lock on the index
folder's `.lock` file (one byte per shard; fcntl locks work across the nodes of NFS and Lustre), and
`ensure_indexes` skips a shard another process is building and comes back for it at the end. So each index is
built once, and whoever waits for one loads it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuclip.atomic import write_with
from neuclip.data.samples import IMAGE_EXTS, image_ext, record_problems
from neuclip.data.shards import ShardError, TarScan, _grouped

INDEX_VERSION = 1
INDEX_DIR = ".neuclip-index"
LOCK_FILE = ".lock"


@dataclass
class ShardIndex:
    """Per sample of one shard (tar order): key, id (-1: none), image/caption member offsets, problems.

    `problems` maps a sample's position to [(kind, reason)], kind "id" for problems with the sample id
    (missing/unparsable .json, missing or non-integer "key"), "sample" for the rest (see check.py).
    """

    path: str
    keys: np.ndarray  # bytes (S)
    ids: np.ndarray  # int64
    image: np.ndarray  # int64 (n, 2): offset, size; -1 when no image member
    image_ext: np.ndarray  # int8: position in IMAGE_EXTS, -1 when none
    text: np.ndarray  # int64 (n, 2): offset, size of .txt; -1 when none
    problems: dict[int, list[tuple[str, str]]]

    def __len__(self) -> int:
        return len(self.ids)

    def key(self, i: int) -> str:
        return self.keys[i].decode()


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_index(path: str | os.PathLike, scanner=TarScan) -> ShardIndex:
    """Scan one shard (headers plus its .txt/.json members) into a ShardIndex; raises ShardError. `scanner`:
    the tar reader (neuclip/data/tar_reference.py's TarfileScan for the tests and the benchmark)."""
    path = Path(path)
    if not path.exists():
        raise ShardError("file not found")
    keys, ids, image, image_ext_i, text, problems = [], [], [], [], [], {}
    with scanner(path) as scan:

        def read(member):
            return None if member is None else scan.read(*member)

        for i, (key, members, repeated) in enumerate(_grouped(scan)):
            sample_id, found = record_problems(
                key, members.keys(), read(members.get("txt")), read(members.get("json")), repeated
            )
            ext = image_ext(members)
            keys.append(key.encode())
            ids.append(-1 if sample_id is None else sample_id)
            image.append(members[ext] if ext else (-1, -1))
            image_ext_i.append(IMAGE_EXTS.index(ext) if ext else -1)
            text.append(members.get("txt", (-1, -1)))
            if found:
                problems[i] = found
    return ShardIndex(
        str(path),
        np.array(keys, dtype=bytes) if keys else np.zeros(0, dtype="S1"),
        np.array(ids, dtype=np.int64),
        np.array(image, dtype=np.int64).reshape(-1, 2),
        np.array(image_ext_i, dtype=np.int8),
        np.array(text, dtype=np.int64).reshape(-1, 2),
        problems,
    )


def index_paths(path: Path) -> list[Path]:
    """Where the index of `path` may live: beside the shards, then in the user cache."""
    path = Path(path).absolute()
    cache = Path(os.environ.get("NEUCLIP_INDEX_CACHE") or Path.home() / ".cache" / "neuclip" / "index")
    folder_tag = hashlib.blake2b(str(path.parent).encode(), digest_size=8).hexdigest()
    return [path.parent / INDEX_DIR / f"{path.name}.npz", cache / folder_tag / f"{path.name}.npz"]


def _load(file: Path, path: Path, stamp: dict) -> ShardIndex | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta["stamp"] != stamp:
                return None
            arrays = {k: z[k] for k in ("keys", "ids", "image", "image_ext", "text")}
    except (OSError, ValueError, KeyError):
        return None  # missing, partial or foreign: rebuild
    problems = {int(i): [tuple(p) for p in found] for i, found in meta["problems"].items()}
    return ShardIndex(str(path), problems=problems, **arrays)


def write_first(files: list[Path], meta: dict, arrays: dict) -> None:
    """`arrays` and `meta` (as JSON) in one .npz, written atomically to the first of `files` whose folder we may
    write to (beside the shards, else the user cache); nothing when none is writable."""
    for file in files:
        try:
            write_with(file, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays), binary=True)
            return
        except OSError:
            continue


def _save(index: ShardIndex, stamp: dict, targets: list[Path]) -> None:
    meta = {"stamp": stamp, "problems": {str(i): p for i, p in index.problems.items()}}
    write_first(targets, meta, {k: getattr(index, k) for k in ("keys", "ids", "image", "image_ext", "text")})


def save_index(index: ShardIndex) -> None:
    """Store `index` as the index of its shard as the shard is now (for writers that know the members, and
    the start-up benchmark's synthetic indexes)."""
    path = Path(index.path)
    _save(index, _stamp(path), index_paths(path))


def _fresh(file: Path, stamp: dict) -> bool:
    """Whether `file` is an index matching `stamp` (reads its meta only)."""
    try:
        with np.load(file, allow_pickle=False) as z:
            return json.loads(str(z["meta"]))["stamp"] == stamp
    except (OSError, ValueError, KeyError):
        return False


def index_is_fresh(path: str | os.PathLike) -> bool:
    """Whether the shard has an index matching its size and mtime (a missing shard has none)."""
    path = Path(path)
    try:
        stamp = _stamp(path)
    except OSError:
        return False
    return any(_fresh(file, stamp) for file in index_paths(path))


_LOCK_FDS: dict[Path, int] = {}  # kept open for the process's life: closing any fd of a file drops its locks


def _lock_fd(folder: Path) -> int | None:
    if folder not in _LOCK_FDS:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _LOCK_FDS[folder] = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None
    return _LOCK_FDS[folder]


@contextmanager
def locked(files: list[Path], name: str, wait: bool = True) -> Iterator[bool]:
    """Hold the lock called `name`: one byte (at its crc32) of the .lock file in the first writable folder of
    `files`. Yields False when `wait` is off and another process holds it; True with no writable folder
    (nothing to share)."""
    fd = next((fd for fd in (_lock_fd(f.parent) for f in files) if fd is not None), None)
    if fd is None:
        yield True
        return
    byte = zlib.crc32(name.encode())
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, byte)
    except BlockingIOError:
        yield False
        return
    try:
        yield True
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, byte)


BUILDS = {"count": 0}  # indexes this process built (tests and start-up messages read it)


def _load_or_build(path: Path, wait: bool = True) -> ShardIndex | None:
    """The cached index, else built under the lock (the cache is read again once the lock is held: another
    process may have built it meanwhile). None when `wait` is off and another process is building it."""
    try:
        stamp = _stamp(path)
    except FileNotFoundError:
        raise ShardError("file not found") from None
    targets = index_paths(path)
    for file in targets:
        if (found := _load(file, path, stamp)) is not None:
            return found
    with locked(targets, path.name, wait) as held:  # the shard's build lock
        if not held:
            return None
        for file in targets:
            if (found := _load(file, path, stamp)) is not None:
                return found
        index = build_index(path)
        BUILDS["count"] += 1
        _save(index, stamp, targets)
        return index


def shard_index(path: str | os.PathLike, cache: bool = True) -> ShardIndex:
    """The index of one shard: loaded from the cache when it matches the shard's size and mtime, else built
    (and cached). Raises ShardError for a shard that cannot be read to the end (never cached)."""
    return _load_or_build(Path(path)) if cache else build_index(path)


def _try_build(shard: str) -> str:
    """"fresh", "built", "busy" (another process holds its lock) or "bad" (not readable: the survey says so)."""
    path = Path(shard)
    if index_is_fresh(path):
        return "fresh"
    before = BUILDS["count"]
    try:
        found = _load_or_build(path, wait=False)
    except ShardError:
        return "bad"
    if found is None:
        return "busy"
    return "built" if BUILDS["count"] > before else "fresh"


@dataclass
class Ensured:
    shards: int
    built: int = 0
    waited: int = 0  # built by another process while this one waited
    bad: int = 0  # unreadable shards: no index (the survey names them)
    seconds: float = 0.0


def ensure_indexes(shards: list[str], jobs: int = 1, start: int = 0,
                   progress: Callable[[Ensured, int], None] | None = None) -> Ensured:
    """Make every shard's index fresh, building the missing or stale ones over `jobs` processes, starting at
    shard `start` (ranks start at different shards so they split the work). A shard another process is
    building is skipped and waited for at the end, so processes that start together build each index once.
    `progress(state, done)` is called after each shard."""
    t0, out = time.perf_counter(), Ensured(len(shards))
    order = shards[start:] + shards[:start]
    busy = []
    jobs = max(1, min(jobs, len(order), os.cpu_count() or 1))
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            verdicts = pool.imap(_try_build, order, chunksize=1)
            for done, (shard, verdict) in enumerate(zip(order, verdicts), 1):
                _count(out, shard, verdict, busy)
                if progress:
                    progress(out, done)
    else:
        for done, shard in enumerate(order, 1):
            _count(out, shard, _try_build(shard), busy)
            if progress:
                progress(out, done)
    for shard in busy:  # another process was building these: wait for its lock, then load
        try:
            _load_or_build(Path(shard))
            out.waited += 1
        except ShardError:
            out.bad += 1
    out.seconds = time.perf_counter() - t0
    return out


def _count(out: Ensured, shard: str, verdict: str, busy: list) -> None:
    if verdict == "built":
        out.built += 1
    elif verdict == "bad":
        out.bad += 1
    elif verdict == "busy":
        busy.append(shard)


def report_progress(prefix: str, every: float = 30.0) -> Callable[[Ensured, int], None]:
    """A progress callback printing, at most every `every` seconds, shards done and the time left at the
    rate so far."""
    t0, last = time.perf_counter(), [0.0]

    def progress(state: Ensured, done: int) -> None:
        now = time.perf_counter() - t0
        if now - last[0] >= every or done == state.shards:
            last[0] = now
            left = now / done * (state.shards - done)
            print(f"{prefix}: {done}/{state.shards} shards ({state.built} built, {state.bad} unreadable), "
                  f"{now:.0f} s so far, about {left:.0f} s left", file=sys.stderr, flush=True)

    return progress
