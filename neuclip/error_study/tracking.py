"""Normaliser error tracked *during* training (config section `error`, docs/method.md §6).

Every `error.every` steps (and at the last step) every rank embeds its share of the training shards with the
current model and its evaluation transform; rank 0 gathers the embeddings, computes the exact alpha* of a
fixed random anchor subset and scores the estimator's own estimate, appending one line to
RUN/error_curve.jsonl. The measurement must not change the run: it works under no_grad in eval mode (no
dropout, no BatchNorm statistics update) and restores every RNG afterwards, so a run with tracking on is
bit-identical to one with it off (tested). The other ranks wait at a barrier while rank 0 computes (the trainer
raises the collective timeout to 2 h when tracking is on). The measurement's time is kept out of the logged
samples/s. A method without a normaliser estimate (SigLIP, iSogCLR) gets a note and no curve.

Cost per measurement: one forward pass over the embedded data plus an anchors x n matmul; `error.shards`
limits the embedded data to the first N shards (the exact alpha* is then over those samples only, which
biases it low at small tau: prefer all shards and a larger `every`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from neuclip.error_study.estimates import SCORED_KINDS
from neuclip.error_study.run_error import anchor_positions, embed_shards, measure, sort_by_id
from neuclip.train import checkpoint as ckpt

CURVE_FILE = "error_curve.jsonl"


@dataclass(frozen=True, kw_only=True)
class TrackingContext:
    """Everything error tracking needs from the run, named (the trainer builds it from the config)."""

    run_dir: str | Path  # RUN: the curve goes to RUN/error_curve.jsonl
    method: str  # for the note when the method keeps no estimate
    every: int  # error.every (0: off)
    anchors: int  # error.anchors
    embed_batch: int  # error.batch_size: images per forward pass while embedding
    shards: list[str]  # the shards to embed (the training shards, cut to error.shards)
    train_batch: int  # train.global_batch_size: the estimate is scored at the training batch
    seed: int  # the run's seed: fixes the anchor subset
    workers: int  # data.workers, for reading the shards
    skip_bad: bool  # data.skip_bad: skip what training skipped
    rank: int
    world: int
    device: torch.device
    bf16: bool  # embed under bf16 autocast, as training computes
    embed_dim: int  # the model's embedding width (a rank with no shard sends 0 rows of it)
    transform: object  # the model's evaluation transform
    tokenizer: object


class ErrorTracker:
    def __init__(self, ctx: TrackingContext, estimator):
        self.ctx, self.estimator = ctx, estimator
        self.path = Path(ctx.run_dir) / CURVE_FILE
        self.enabled = bool(ctx.every) and estimator.estimate_kind in SCORED_KINDS
        if ctx.every and not self.enabled and ctx.rank == 0:
            print(
                f"neuclip train: error.every is set but {ctx.method} keeps no normaliser estimate "
                f"(estimate_kind={estimator.estimate_kind}); no error curve is written",
                file=sys.stderr,
                flush=True,
            )

    def due(self, step: int, total: int) -> bool:
        return self.enabled and (step % self.ctx.every == 0 or step == total)

    def __call__(self, step: int, epoch: float, model) -> None:
        """Collective: every rank embeds its share of the shards, rank 0 gathers, measures and writes."""
        c, t0 = self.ctx, time.perf_counter()
        rng, was_training = ckpt.rng_state(), model.training
        model.eval()
        try:
            local = embed_shards(
                model,
                c.transform,
                c.tokenizer,
                c.shards[c.rank :: c.world],
                c.embed_batch,
                c.device,
                c.workers,
                c.skip_bad,
                c.bf16,
                allow_empty=c.world > 1,
            )
            rows = _gather_rows(local, c.embed_dim, c.device, c.world) if c.world > 1 else sort_by_id(*local)
            if c.rank == 0:
                image, text, ids = rows
                anchors = anchor_positions(image.shape[0], c.anchors, c.seed)
                row = measure(self.estimator, image, text, ids, anchors, c.train_batch, c.seed)
            del local, rows
        finally:
            model.train(was_training)
            ckpt.set_rng_state(rng)
        if c.rank == 0:
            row = {"step": step, "epoch": epoch, **row, "seconds": round(time.perf_counter() - t0, 3)}
            # an append-only log (a resume truncates it to the checkpoint's step): fsync, no rename
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if c.world > 1:
            dist.barrier()


def _gather_rows(local, dim: int, device, world: int):
    """Every rank's (image, text, ids) rows on rank 0, sorted by id (None elsewhere). Ranks hold different
    numbers of rows (or none): each pads to the largest count for `dist.gather`, and rank 0 trims."""
    image, text, ids = (
        local
        if local is not None
        else (
            torch.empty(0, dim, device=device),
            torch.empty(0, dim, device=device),
            torch.empty(0, dtype=torch.long, device=device),
        )
    )
    count = torch.tensor([ids.numel()], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    most, rank0 = max(counts), dist.get_rank() == 0
    gathered = []
    for part in (torch.cat([image, text], dim=1), ids):
        padded = part.new_zeros((most, *part.shape[1:]))
        padded[: part.shape[0]] = part
        bucket = [torch.empty_like(padded) for _ in range(world)] if rank0 else None
        dist.gather(padded, bucket, dst=0)
        gathered.append(torch.cat([b[:c] for b, c in zip(bucket, counts)]) if rank0 else None)
    if not rank0:
        return None
    if gathered[1].numel() == 0:
        raise ValueError("error tracking: no rank could read a sample of the training shards")
    both, ids = gathered
    return sort_by_id(both[:, :dim], both[:, dim:], ids)
