"""One optimiser step, method-agnostic.

The local batch goes through the open_clip model (DDP-wrapped when distributed; bf16 autocast when asked),
the estimator turns the local embeddings, sample ids, step and fractional epoch into a loss (it gathers the
global batch itself), backward, the estimator's own parameters' gradients are averaged across ranks (they
live outside DDP), gradients are clipped, and then - only if the loss, every estimator statistic and the
gradient norm are finite on every rank - the schedule sets each group's lr, AdamW steps, BatchNorm statistics
are made the same on every rank (train.batchnorm) and the estimator projects (clamps tau). A non-finite value
raises before the optimiser step, so the last checkpoint stays the last good state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from neuclip.estimators.base import Batch
from neuclip.train.data import DataError
from neuclip.train.optim import lr_multiplier, optimized_params, set_lr


class TrainingDiverged(RuntimeError):
    """A non-finite loss, estimator statistic or gradient norm."""


@dataclass
class StepResult:
    loss: float  # mean over ranks
    grad_norm: float
    stats: dict  # this rank's estimator statistics
    stop: bool  # some rank got a preemption signal


def _first_non_finite(stats: dict) -> str | None:
    for k, v in stats.items():
        if isinstance(v, (int, float)) and not math.isfinite(v):
            return k
    return None


class Stepper:
    """The step with everything that stays fixed across steps bound once."""

    def __init__(
        self,
        model,
        estimator,
        optimizer,
        *,
        cfg: dict,
        world: int,
        device,
        bf16: bool,
        total_steps: int,
        steps_per_epoch: int,
        ckpt_dir: Path,
        sync_buffers: Callable[[], None] | None = None,
    ):
        self.model, self.estimator, self.optimizer = model, estimator, optimizer
        self.world, self.device, self.bf16 = world, device, bf16
        self.total, self.spe, self.ckpt_dir = total_steps, steps_per_epoch, ckpt_dir
        self.sync_buffers = sync_buffers  # rank 0's BatchNorm statistics to every rank (setup.buffer_sync)
        t = cfg["train"]
        self.clip = float(t["grad_clip"]) if t["grad_clip"] else math.inf
        self.warmup, self.data_size = t["warmup_steps"], cfg["data"]["data_size"]
        self.params = optimized_params(optimizer)
        self.est_params = [p for g in estimator.param_groups() for p in g["params"] if p.requires_grad]

    def __call__(self, images, texts, ids, step: int, stop_requested: Callable[[], bool]) -> StepResult:
        """Step `step` -> `step + 1` on this rank's batch; collective under a process group."""
        if int(ids.max()) >= self.data_size:
            raise DataError(
                f"sample id {int(ids.max())} >= data.data_size ({self.data_size}): set data.data_size to max id + 1"
            )
        result = self._loss(images, texts, ids, step)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        grad_norm = self._sync_and_clip()
        bad_stat = _first_non_finite(result.stats)
        flags = torch.stack(
            [
                result.loss.detach().float().reshape(()),
                torch.tensor(float(bad_stat is not None), device=result.loss.device),
                torch.tensor(float(stop_requested()), device=result.loss.device),
            ]
        ).to(self.device)
        if self.world > 1:
            dist.all_reduce(flags)
            flags[0] /= self.world
        loss, any_bad_stat, stop = float(flags[0]), float(flags[1]) > 0, float(flags[2]) > 0
        out = StepResult(loss, float(grad_norm), result.stats, stop)
        self._check(out, any_bad_stat, bad_stat, step)
        set_lr(self.optimizer, lr_multiplier(step, self.warmup, self.total), self.estimator.lr_factors())
        self.optimizer.step()
        if self.sync_buffers is not None:
            self.sync_buffers()
        self.estimator.after_optimizer_step()
        return out

    def _loss(self, images, texts, ids, step: int):
        images = images.to(self.device, non_blocking=True)
        texts = texts.to(self.device, non_blocking=True)
        ids = ids.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(images, texts)
        image_f, text_f = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        return self.estimator(
            Batch(image=image_f.float(), text=text_f.float(), ids=ids, step=step, epoch=step / self.spe)
        )

    def _sync_and_clip(self) -> torch.Tensor:
        """Average the estimator's gradients over ranks (DDP does the model's), clip; the total norm."""
        if self.world > 1:
            for p in self.est_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)
        if math.isfinite(self.clip):
            return torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        # no clipping: only the norm (for the log and the divergence check)
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def _check(self, out: StepResult, any_bad_stat: bool, bad_stat: str | None, step: int) -> None:
        where = f"at step {step + 1} (epoch {(step + 1) / self.spe:.3f})"
        kept = f"the last good checkpoint is kept in {self.ckpt_dir}"
        if not math.isfinite(out.loss):
            raise TrainingDiverged(f"loss is {out.loss} {where}; {kept}")
        if any_bad_stat:
            name = bad_stat or "(on another rank)"
            raise TrainingDiverged(f"estimator statistic {name!r} is {out.stats.get(name)} {where}; {kept}")
        if not math.isfinite(out.grad_norm):
            raise TrainingDiverged(f"gradient norm is {out.grad_norm} {where}; {kept}")
