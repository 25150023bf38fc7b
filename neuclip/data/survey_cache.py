"""The survey of a shard list, done once per data-set version and read back at every later start.

`survey` (neuclip/data/check.py) reads every shard's index and checks every id for duplicates: at DFN-1B's
1.4e9 samples that is minutes per start. Its result depends only on the shards' bytes, the sidecars it
compares counts with (sizes.json, `_stats.json`) and its own settings, so it is stored beside the first
shard's index as `survey-<key>.npz`, the key a hash of those: each shard's path, size and mtime (as the index
is keyed), the sidecars' size and mtime, INDEX_VERSION, SURVEY_VERSION and the settings. A resume, or another
cell on the same data, reads it back and performs no duplicate check; change any shard or sidecar and the key
changes. Several processes starting together compute it once: the first takes the survey's lock (a byte of
the index folder's .lock file), the others wait and read what it wrote.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from neuclip.data.check import Problem, Survey, survey
from neuclip.data.index import INDEX_VERSION, index_paths, locked, write_first

SURVEY_VERSION = 1


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


def survey_key(shards: list[str], settings: dict) -> str:
    """A hash of everything the survey's result depends on."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([INDEX_VERSION, SURVEY_VERSION, settings], sort_keys=True).encode())
    folders = set()
    for shard in shards:
        path = Path(shard).absolute()
        folders.add(path.parent)
        stats = path.with_name(path.name.split(".")[0] + "_stats.json")
        h.update(f"{path}|{_stamp(path)}|{_stamp(stats)};".encode())
    for folder in sorted(folders):
        h.update(f"{folder}/sizes.json|{_stamp(folder / 'sizes.json')};".encode())
    return h.hexdigest()


def _files(shards: list[str], key: str) -> list[Path]:
    return [target.parent / f"survey-{key}.npz" for target in index_paths(Path(shards[0]))]


def _load(file: Path, shards: list[str]) -> Survey | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            samples, counts = z["samples"], z["counts"]
            values, which, lengths = z["usable_values"], z["usable_shards"], z["usable_lengths"]
    except (OSError, ValueError, KeyError):
        return None  # missing, partial or foreign: survey again
    usable: list[np.ndarray | None] = [None] * len(shards)
    for s, piece in zip(which.tolist(), np.split(values, np.cumsum(lengths)[:-1]) if len(which) else []):
        usable[s] = piece
    problems = [Problem(shards[s], key, reason, kind) for s, key, reason, kind in meta["problems"]]
    return Survey(list(shards), [None if n < 0 else int(n) for n in samples.tolist()], usable, counts, problems,
                  meta["max_id"], meta["captions_over"])


def _save(sv: Survey, files: list[Path]) -> None:
    order = {shard: s for s, shard in enumerate(sv.shards)}
    meta = {"max_id": sv.max_id, "captions_over": sv.captions_over,
            "problems": [[order[p.shard], p.key, p.reason, p.kind] for p in sv.problems]}
    which = [s for s, u in enumerate(sv.usable) if u is not None]
    arrays = {
        "samples": np.array([-1 if n is None else n for n in sv.samples], dtype=np.int64),
        "counts": np.asarray(sv.counts, dtype=np.int64),
        "usable_values": np.concatenate([sv.usable[s] for s in which] or [np.zeros(0)]).astype(np.int64),
        "usable_shards": np.array(which, dtype=np.int64),
        "usable_lengths": np.array([len(sv.usable[s]) for s in which], dtype=np.int64),
    }
    write_first(files, meta, arrays)


def cached_survey(shards: list[str], before: Callable[[], None] | None = None, **settings) -> Survey:
    """`survey(shards, **settings)`, read back when this data-set version was surveyed before (see above).
    `before()` runs only when it was not, ahead of the survey (the trainer builds missing indexes there)."""
    shards = [str(s) for s in shards]
    key = survey_key(shards, settings)
    files = _files(shards, key)
    for file in files:
        if (found := _load(file, shards)) is not None:
            return found
    if before is not None:
        before()
    with locked(files, f"survey-{key}"):
        for file in files:  # surveyed by another process while we waited
            if (found := _load(file, shards)) is not None:
                return found
        sv = survey(shards, **settings)
        _save(sv, files)
        return sv
