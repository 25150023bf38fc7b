"""The process a run lives in: its rank and device, the process group, the run-folder lock and the
preemption signals. Nothing here knows about models or data."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank if `ok` is true on every rank (a collective)."""
        if self.world == 1:
            return ok
        flag = torch.tensor(int(ok), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (a list of one without a process group)."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def wants_cuda(cfg: dict) -> bool:
    want = cfg["train"]["device"]
    return want == "cuda" or (want == "auto" and torch.cuda.is_available())


def setup_distributed(device_kind: str, timeout_min: int) -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun/submitit's environment; joins the process group if world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=timeout_min))
    return rank, world, local_rank


def pick_device(cfg: dict, local_rank: int) -> torch.device:
    if wants_cuda(cfg):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is cuda but torch sees no GPU")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def precision(cfg: dict, device: torch.device) -> str:
    """train.precision with "auto" resolved: bf16 on GPU, fp32 on CPU."""
    p = cfg["train"]["precision"]
    return p if p != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunLocked(RuntimeError):
    """Another trainer holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One trainer per run folder (advisory flock; silently skipped where the file system lacks locks)."""
    import fcntl

    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(
                f"another trainer is running in {run_dir} (its .lock is held); wait for it "
                "or stop it before starting this one"
            ) from None
        except OSError:
            pass  # no locking on this file system
        yield
    finally:
        os.close(fd)


class Interrupted(Exception):
    """A preemption signal arrived inside `Signals.interruptible()`: the newest checkpoint is current."""


class Signals:
    """SIGTERM/SIGUSR2 set a flag; the loop checkpoints at the next step boundary, then `forward()` hands
    the signal to whoever handled it before us (submitit's requeue handler, when run by submitit). Inside
    `interruptible()` (a long operation after a checkpoint of the current step, e.g. an error measurement) a
    signal raises Interrupted at once instead: nothing is lost by stopping there."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)

    def __init__(self):
        self.signum: int | None = None
        self.prev: dict = {}
        self.now = False  # inside interruptible(): a signal raises

    @contextlib.contextmanager
    def interruptible(self):
        self.now = True
        try:
            yield
        finally:
            self.now = False

    def __enter__(self):
        self.pid = os.getpid()  # forked data-loader workers inherit the handler: they must not act on it
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.prev[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() == self.pid and self.signum is None:
            self.signum = signum
            if self.now:
                self.now = False
                print(f"neuclip train: got {signal.Signals(signum).name}; the checkpoint is current: stopping now",
                      file=sys.stderr, flush=True)
                raise Interrupted(signal.Signals(signum).name)
            print(
                f"neuclip train: got {signal.Signals(signum).name}; checkpointing at the next step boundary",
                file=sys.stderr,
                flush=True,
            )

    def requested(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def forward(self) -> None:
        prev = self.prev.get(self.signum)
        self.restore()
        if callable(prev):
            prev(self.signum, None)

    def restore(self) -> None:
        for s, h in self.prev.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self.prev = {}

    def __exit__(self, *exc):
        self.restore()
