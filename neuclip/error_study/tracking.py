"""Normaliser error tracked *during* training (config section `error`, METHOD.md §6).

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
from pathlib import Path

import torch
import torch.distributed as dist

from neuclip.error_study.estimates import SCORED_KINDS
from neuclip.error_study.run_error import anchor_positions, embed_shards, measure, sort_by_id
from neuclip.train import checkpoint as ckpt

CURVE_FILE = "error_curve.jsonl"


class ErrorTracker:
    def __init__(
        self,
        cfg: dict,
        estimator,
        shards: list[str],
        rank: int,
        world: int,
        bf16: bool,
        embed_dim: int,
        transform,
        tokenizer,
        device,
    ):
        e = cfg["error"]
        self.embed_dim, self.transform, self.tokenizer, self.device = embed_dim, transform, tokenizer, device
        self.every, self.anchors, self.embed_batch = e["every"], e["anchors"], e["batch_size"]
        self.shards = shards[: e["shards"]] if e["shards"] else shards
        self.seed = cfg["seed"]
        self.estimator, self.rank, self.world, self.bf16 = estimator, rank, world, bf16
        self.train_batch, self.workers, self.skip_bad = (
            cfg["train"]["global_batch_size"],
            cfg["data"]["workers"],
            cfg["data"]["skip_bad"],
        )
        self.path = Path(cfg["run_dir"]) / CURVE_FILE
        self.enabled = bool(self.every) and estimator.estimate_kind in SCORED_KINDS
        if self.every and not self.enabled and rank == 0:
            print(
                f"neuclip train: error.every is set but {cfg['method']['name']} keeps no normaliser estimate "
                f"(estimate_kind={estimator.estimate_kind}); no error curve is written",
                file=sys.stderr,
                flush=True,
            )

    def due(self, step: int, total: int) -> bool:
        return self.enabled and (step % self.every == 0 or step == total)

    def __call__(self, step: int, epoch: float, model) -> None:
        """Collective: every rank embeds its share of the shards, rank 0 gathers, measures and writes."""
        t0 = time.perf_counter()
        rng, was_training = ckpt.rng_state(), model.training
        model.eval()
        try:
            local = embed_shards(
                model,
                self.transform,
                self.tokenizer,
                self.shards[self.rank :: self.world],
                self.embed_batch,
                self.device,
                self.workers,
                self.skip_bad,
                self.bf16,
                allow_empty=self.world > 1,
            )
            if self.world > 1:
                rows = _gather_rows(local, self.embed_dim, self.device, self.world)
            else:
                rows = sort_by_id(*local)
            if self.rank == 0:
                image, text, ids = rows
                anchors = anchor_positions(image.shape[0], self.anchors, self.seed)
                row = measure(self.estimator, image, text, ids, anchors, self.train_batch, self.seed)
            del local, rows
        finally:
            model.train(was_training)
            ckpt.set_rng_state(rng)
        if self.rank == 0:
            row = {"step": step, "epoch": epoch, **row, "seconds": round(time.perf_counter() - t0, 3)}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.world > 1:
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
