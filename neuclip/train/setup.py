"""Building a run's parts from its resolved config: the step geometry, the open_clip model with its
transforms, the estimator, the optimiser and the data.

`make_data` (the shards' usable samples, from their cached index) and `make_loader` are the one place the
trainer constructs its data pipeline; what the loop needs from the loader is `next_batch()`, `bad_counts()`,
`state()` (the data position, saved in checkpoints) and `close()`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from neuclip.data.index import ensure_indexes, index_is_fresh, report_progress
from neuclip.data.keys import id_beyond
from neuclip.estimators.base import EstimatorContext
from neuclip.export import create_model
from neuclip.train.config import ConfigError
from neuclip.train.data import DataError, TrainData, TrainLoader
from neuclip.train.optim import build_optimizer
from neuclip.train.runtime import Process


@dataclass(frozen=True)
class Geometry:
    """How the run's samples divide into steps. The data order depends on the global batch alone, so the
    number of loader workers is free and only the world size must divide the batch."""

    batch: int  # train.global_batch_size
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, cfg: dict, world: int, num_samples: int | None = None) -> Geometry:
        """`num_samples`: the usable samples in the shards (the trainer's epoch); without it (preflight, before
        the data exists) data.train_num_samples stands in."""
        t, d = cfg["train"], cfg["data"]
        batch = t["global_batch_size"]
        if batch % world:
            raise ConfigError(f"train.global_batch_size ({batch}) must be divisible by the world size ({world})")
        spe = max(1, (d["train_num_samples"] if num_samples is None else num_samples) // batch)
        if t["max_steps"] is not None:
            return cls(batch, spe, int(t["max_steps"]))
        total = round(t["epochs"] * spe)
        if total < 1:  # it silently became one step
            raise ConfigError(
                f"train.epochs ({t['epochs']}) is {t['epochs'] * spe:.3g} steps of the {spe} an epoch has at global "
                f"batch {batch}: set train.max_steps for a run shorter than an epoch, or epochs >= {0.5 / spe:.3g}"
            )
        return cls(batch, spe, total)


@dataclass
class Parts:
    """What the loop trains and checkpoints, and the model's input side."""

    model: torch.nn.Module  # the open_clip model itself (never the DDP wrapper)
    estimator: torch.nn.Module
    optimizer: torch.optim.Optimizer
    embed_dim: int
    train_transform: object
    eval_transform: object
    tokenizer: object


def _embed_dim(model, model_name: str) -> int:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg and "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    return int(model.visual.output_dim)


def build_parts(cfg: dict, geo: Geometry, device: torch.device) -> Parts:
    """Model, estimator and optimiser, freshly initialised from the global seed (set by the caller)."""
    model, train_tf, eval_tf, tokenizer = create_model(cfg["model"], device=device)
    for name in ("logit_scale", "logit_bias"):  # the estimator owns the temperature (and SigLIP's bias)
        p = getattr(model, name, None)
        if isinstance(p, torch.nn.Parameter):
            p.requires_grad_(False)
    ctx = EstimatorContext(
        embed_dim=_embed_dim(model, cfg["model"]),
        data_size=cfg["data"]["data_size"],
        num_samples=int(cfg["data"]["train_num_samples"] or 0),
        total_epochs=geo.total_steps / geo.steps_per_epoch,
        total_steps=geo.total_steps,
        steps_per_epoch=geo.steps_per_epoch,
    )
    from neuclip.estimators.registry import build_estimator  # looked up per call: tests substitute it

    m = cfg["method"]
    estimator = build_estimator(m["name"], m["options"], ctx, common=m.get("common_options")).to(device)
    optimizer = build_optimizer(model, estimator, cfg["train"])
    return Parts(model, estimator, optimizer, ctx.embed_dim, train_tf, eval_tf, tokenizer)


def make_data(cfg: dict, shards: list[str], proc: Process) -> TrainData:
    """The usable samples of the shards and their epoch order. A start after the first on the same data reads
    the stored survey and nothing else; otherwise the shards' indexes are read, and any missing or stale one is
    built first (said with a count and the time left), or refused with data.missing_index: refuse."""
    d = cfg["data"]
    data = TrainData(
        shards,
        seed=cfg["seed"],
        global_batch=cfg["train"]["global_batch_size"],
        block=d["shuffle_buffer"],
        skip_bad=d["skip_bad"],
        report=proc.rank == 0,
        data_size=d["data_size"],
        max_caption_bytes=d["max_caption_bytes"],
        before_survey=lambda: _ensure_indexes(shards, d["missing_index"], proc),  # no stored survey: first start
    )
    if data.max_id >= d["data_size"]:
        raise DataError(
            id_beyond(shards, d["data_size"])
            or f"the shards hold sample id {data.max_id} >= data.data_size ({d['data_size']}): set data.data_size "
            "to max id + 1 (the size of per-sample state)"
        )
    if proc.rank == 0 and d["train_num_samples"] != data.num_samples:
        print(
            f"neuclip train: data.train_num_samples is {d['train_num_samples']} but the shards hold "
            f"{data.num_samples} usable samples: an epoch is {data.num_samples} samples (from the shards' index)",
            file=sys.stderr,
            flush=True,
        )
    return data


def _ensure_indexes(shards: list[str], missing: str, proc: Process) -> None:
    """Every rank checks every shard's index (the same verdict on all ranks), then all build the missing ones
    together, each starting at its own offset: the indexes' locks split the work between the ranks, and with
    the other cells starting on the same shards."""
    stale = [s for s in shards if not index_is_fresh(s)]
    if not stale:
        return
    what = f"{len(stale)} of {len(shards)} shards have no index or a stale one (e.g. {stale[0]})"
    if missing == "refuse":
        raise DataError(f"{what}: build them first with `neuclip data index '{_folder_of(shards)}' --jobs N`, "
                        "or set data.missing_index: build to build them at the start")
    if proc.rank == 0:
        print(f"neuclip train: {what}: building them now, {proc.world} rank(s) sharing the work (`neuclip data "
              "index --jobs N` builds them beforehand, in parallel)", file=sys.stderr, flush=True)
    progress = report_progress("neuclip train: indexing") if proc.rank == 0 else None
    done = ensure_indexes(stale, start=proc.rank * len(stale) // proc.world, progress=progress)
    print(f"neuclip train: rank {proc.rank} built {done.built} shard index(es) in {done.seconds:.1f} s",
          file=sys.stderr, flush=True)


def _folder_of(shards: list[str]) -> str:
    """A folder or single shard to name in a message about `shards`."""
    folders = {str(Path(s).parent) for s in shards}
    return shards[0] if len(shards) == 1 else (folders.pop() if len(folders) == 1 else "PATTERN")


def make_loader(cfg: dict, data: TrainData, proc: Process, start: int, bad_decoded: int, parts: Parts):
    """This rank's training batches from step `start` on."""
    return TrainLoader(
        data,
        rank=proc.rank,
        world=proc.world,
        workers=cfg["data"]["workers"],
        start=start,
        bad_decoded=bad_decoded,
        transform=parts.train_transform,
        tokenizer=parts.tokenizer,
        pin_memory=proc.device.type == "cuda",
    )


def wrap_ddp(model: torch.nn.Module, proc: Process, batchnorm: str = "broadcast") -> torch.nn.Module:
    """What the step calls: DistributedDataParallel(model) under a process group, else the model.

    `batchnorm` (train.batchnorm): "sync" converts BatchNorm layers to SyncBatchNorm in place (same parameters
    and buffers, so checkpoints and the export are unchanged; CUDA only); "broadcast" leaves them, and the step
    copies rank 0's statistics to every rank afterwards (`buffer_sync`), so DDP need not broadcast them."""
    if proc.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if batchnorm == "sync" and batchnorm_buffers(model):
        if proc.device.type != "cuda":
            raise ConfigError("train.batchnorm: sync needs CUDA (torch's SyncBatchNorm does not run on CPU): "
                              "use train.batchnorm: broadcast, or train.device: cuda")
        if torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) is not model:
            raise ConfigError("train.batchnorm: sync: the model itself is a BatchNorm layer")
    return DistributedDataParallel(
        model,
        device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
        broadcast_buffers=False,
    )


def batchnorm_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Running statistics (and batch counters) of the model's BatchNorm layers."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers(recurse=False)]


def buffer_sync(model: torch.nn.Module, proc: Process, batchnorm: str):
    """A callable giving every rank rank 0's BatchNorm statistics (one broadcast per dtype), or None where
    nothing can differ: one process, no BatchNorm, or SyncBatchNorm (every rank computes the same update).

    DDP's own broadcast_buffers=True (open_clip's default) sends rank 0's buffers at the *start* of each
    forward, so the other ranks' copies differ between steps, when checkpoints, error tracking (eval mode)
    and the export read them. Sending them right after each step gives the same statistics to every rank at
    every step boundary, and rank 0's trajectory is unchanged (BatchNorm uses batch statistics in training)."""
    buffers = batchnorm_buffers(model)
    if proc.world == 1 or batchnorm == "sync" or not buffers:
        return None
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in buffers:
        groups.setdefault(b.dtype, []).append(b)

    @torch.no_grad()
    def sync() -> None:
        for tensors in groups.values():
            flat = _flatten_dense_tensors(tensors)
            dist.broadcast(flat, src=0)
            for b, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                b.copy_(value)

    return sync
