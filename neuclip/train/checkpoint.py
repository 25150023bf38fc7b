"""Atomic checkpoints of plain data (tensors, numbers, strings, lists, dicts) loaded with weights_only=True.

`RUN/checkpoints/step_000001000.pt` holds the state *after* that many optimiser steps. Written through
neuclip/atomic.py (a temp file in the same folder, fsynced and renamed), so a killed job never leaves a half
file under a real name; the oldest are deleted beyond `keep_last`. Loading tries the newest first and falls
back to older ones if a file is unreadable (a disk that lost data despite fsync), saying so.

Sharded estimator state (per-sample arrays split by sample id) goes to one file per rank beside it,
`step_000001000.rank00003-of-00008.pt`, each written by its own rank *before* rank 0 writes the main file: a
main file therefore always has its shards, and shards without a main file (a kill in between) are leftovers
that `remove_stale_temps` clears. Shards are read memory-mapped, so loading one does not hold a second copy.
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from neuclip.atomic import write_with

_NAME = re.compile(r"^step_(\d{9,})\.pt$")
_SHARD = re.compile(r"^step_(\d{9,})\.rank\d{5,}-of-\d{5,}\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:09d}.pt"


def shard_path(folder: Path, step: int, rank: int, world: int) -> Path:
    return Path(folder) / f"step_{step:09d}.rank{rank:05d}-of-{world:05d}.pt"


def save_shard(folder: Path, step: int, rank: int, world: int, state: dict) -> Path:
    """One rank's shard of step `step` (call before the main file is written)."""
    return write_with(shard_path(folder, step, rank, world), lambda f: torch.save(state, f), binary=True)


def load_shard(folder: Path, step: int, rank: int, world: int) -> dict:
    return torch.load(shard_path(folder, step, rank, world), map_location="cpu", weights_only=True, mmap=True)


def _shards_of(folder: Path, step: int) -> list[Path]:
    return sorted(Path(folder).glob(f"step_{step:09d}.rank*-of-*.pt"))


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / n) for n in os.listdir(folder) if (m := _NAME.match(n))]
    return sorted(found)


def save(folder: Path, step: int, state: dict, keep_last: int) -> Path:
    final = write_with(checkpoint_path(folder, step), lambda f: torch.save(state, f), binary=True)
    for old_step, old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)  # the main file first: what is left is never a main file without shards
        for shard in _shards_of(folder, old_step):
            shard.unlink(missing_ok=True)
    return final


def remove_stale_temps(folder: Path) -> None:
    """Temp files of writers that were killed mid-write."""
    folder = Path(folder)
    if folder.is_dir():
        mains = {step for step, _ in list_checkpoints(folder)}
        for name in os.listdir(folder):
            if name.startswith(".step_") and ".pt." in name:  # .step_N.pt.XXXX.tmp (neuclip.atomic)
                (folder / name).unlink(missing_ok=True)
            elif (m := _SHARD.match(name)) and int(m.group(1)) not in mains:  # shards of an unfinished save
                (folder / name).unlink(missing_ok=True)


class CheckpointsUnreadable(RuntimeError):
    """Every kept checkpoint of a run is unreadable: starting over would discard the run's progress."""


def load_latest(folder: Path, map_location="cpu", complete=None, agree=None,
                unreadable: list | None = None) -> tuple[Path, dict] | None:
    """The newest readable checkpoint (path, state), or None when the folder holds none; the newer checkpoints
    that could not be read are appended to `unreadable`. `complete(path, state)` may read more (e.g. this
    rank's estimator shards) and raise if it cannot; `agree(ok)` makes the ranks take the same checkpoint (a
    collective: every rank must call this function). Checkpoints that exist but none of which can be read
    raise CheckpointsUnreadable (nothing is deleted): a run that silently restarted from step 0 would truncate
    its logs, and the unreadable files, numbered higher, would make `keep_last` prune every new checkpoint, so
    it would never progress."""
    found = list_checkpoints(folder)
    skipped = unreadable if unreadable is not None else []
    errors = []
    for _step, path in reversed(found):
        state, err = None, None
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
            if complete is not None:
                state = complete(path, state)
        except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
            state, err = None, e
        ok = state is not None
        if agree is not None:
            ok = agree(ok)
        if ok:
            return path, state
        skipped.append(path)
        errors.append(f"{path.name}: {err!r}" if err is not None else f"{path.name}: unreadable on another rank")
        print(
            f"neuclip train: checkpoint {path} is unreadable ({err!r} here; or on another rank); trying an older one",
            file=sys.stderr,
            flush=True,
        )
    if found:
        raise CheckpointsUnreadable(
            f"every kept checkpoint in {folder} is unreadable ({'; '.join(errors)}); nothing was deleted and the "
            "run was not restarted from step 0. Restore a good copy, or move the folder's checkpoints aside to "
            "start the run over"
        )
    return None


def set_aside(paths: list[Path]) -> list[Path]:
    """Rename unreadable checkpoints (and their shards) to *.unreadable: kept for inspection, out of the way of
    `keep_last`, which would otherwise prune the run's new, lower-numbered checkpoints before them."""
    moved = []
    for path in paths:
        step = int(_NAME.match(path.name).group(1))
        for old in [path, *_shards_of(path.parent, step)]:
            if old.exists():
                new = old.with_name(old.name + ".unreadable")
                old.rename(new)
                moved.append(new)
    return moved


def rng_state() -> dict:
    """Every RNG this process uses, as plain data."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
