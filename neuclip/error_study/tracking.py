"""Normaliser error tracked *during* training (config section `error`, docs/method.md §6).

Every `error.every` steps (and at the last step) the ranks measure together (run_error.measure_streaming):
the anchors, a fixed random subset of the training samples, are embedded by the ranks holding them and shared;
each rank then streams its share of the training shards through the current model with its evaluation
transform, keeping only per-anchor running log-sums, which are combined across ranks into the exact alpha*;
the estimator's own estimate is scored and rank 0 appends one line to RUN/error_curve.jsonl. Memory per rank
is anchors x d plus one embedding batch, never n x d. The measurement must not change the run: it works under
no_grad in eval mode (no dropout, no BatchNorm statistics update; every rank has rank 0's BatchNorm statistics,
train.batchnorm) and restores every RNG afterwards, so a run with tracking on is bit-identical to one with it
off (tested). The measurement's time is kept out of the logged samples/s. A method without a normaliser
estimate (SigLIP, iSogCLR) gets a note and no curve.

Cost per measurement: one forward pass over the data (each rank its share) plus an anchors x n/world matmul
per rank; `error.shards` limits the embedded data to the first N shards (the exact alpha* is then over those
samples only, which biases it low at small tau: prefer all shards and a larger `every`).
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
from neuclip.error_study.run_error import measure_streaming
from neuclip.train import checkpoint as ckpt
from neuclip.train.runfiles import CURVE_FILE
from neuclip.train.trainer import train as train_run


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
        """Collective: the ranks measure together (each streams its share of the shards); rank 0 writes."""
        c, t0 = self.ctx, time.perf_counter()
        rng, was_training = ckpt.rng_state(), model.training
        model.eval()
        try:
            row = measure_streaming(
                self.estimator, model, c.transform, c.tokenizer, c.shards, anchors=c.anchors,
                train_batch=c.train_batch, seed=c.seed, embed_batch=c.embed_batch, device=c.device,
                embed_dim=c.embed_dim, workers=c.workers, skip_bad=c.skip_bad, bf16=c.bf16, rank=c.rank,
                world=c.world,
            )
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


def make_tracker(cfg: dict, parts, shards: list[str], proc, bf16: bool) -> ErrorTracker:
    """The run's error tracker (error.every), from the trainer's parts (neuclip/train/setup.py Parts, Process)."""
    e, run_dir = cfg["error"], cfg["run_dir"]
    ctx = TrackingContext(
        run_dir=run_dir,
        method=cfg["method"]["name"],
        every=e["every"],
        anchors=e["anchors"],
        embed_batch=e["batch_size"],
        shards=shards[: e["shards"]] if e["shards"] else shards,
        train_batch=cfg["train"]["global_batch_size"],
        seed=cfg["seed"],
        workers=cfg["data"]["workers"],
        skip_bad=cfg["data"]["skip_bad"],
        rank=proc.rank,
        world=proc.world,
        device=proc.device,
        bf16=bf16,
        embed_dim=parts.embed_dim,
        transform=parts.eval_transform,
        tokenizer=parts.tokenizer,
    )
    return ErrorTracker(ctx, parts.estimator)


def train(cfg: dict) -> dict:
    """The trainer with this run's error tracking (what a train job runs): the trainer takes the tracker as a
    hook, so it never imports the error study; the error study imports the trainer."""
    return train_run(cfg, tracker_factory=make_tracker)
