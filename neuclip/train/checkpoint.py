"""Atomic checkpoints of plain data (tensors, numbers, strings, lists, dicts) loaded with weights_only=True.

`RUN/checkpoints/step_000001000.pt` holds the state *after* that many optimiser steps. Written through
neuclip/atomic.py (a temp file in the same folder, fsynced and renamed), so a killed job never leaves a half
file under a real name; the oldest are deleted beyond `keep_last`. Loading tries the newest first and falls
back to older ones if a file is unreadable (a disk that lost data despite fsync), saying so.
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


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:09d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / n) for n in os.listdir(folder) if (m := _NAME.match(n))]
    return sorted(found)


def save(folder: Path, step: int, state: dict, keep_last: int) -> Path:
    final = write_with(checkpoint_path(folder, step), lambda f: torch.save(state, f), binary=True)
    for _, old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def remove_stale_temps(folder: Path) -> None:
    """Temp files of writers that were killed mid-write."""
    folder = Path(folder)
    if folder.is_dir():
        for name in os.listdir(folder):
            if name.startswith(".step_") and ".pt." in name:  # .step_N.pt.XXXX.tmp (neuclip.atomic)
                (folder / name).unlink(missing_ok=True)


def load_latest(folder: Path, map_location="cpu") -> tuple[Path, dict] | None:
    for _step, path in reversed(list_checkpoints(folder)):
        try:
            return path, torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file: try the previous one
            print(
                f"neuclip train: checkpoint {path} is unreadable ({err!r}); trying an older one",
                file=sys.stderr,
                flush=True,
            )
    return None


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
