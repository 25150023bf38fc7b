"""The training loop: one function, `train(cfg, tracker_factory)`, that starts or resumes the run in `cfg["run_dir"]`
(the error study's tracker arrives as a hook: neuclip/error_study/tracking.py `train` passes it).

The trainer knows nothing method-specific: an *estimator* turns embeddings into a loss. Its parts:

    runtime.py    rank and device, the process group, the run-folder lock, preemption signals
    setup.py      step geometry; model, estimator and optimiser; the data and its loader
    step.py       one optimiser step and the divergence check
    resume.py     the trainer's state in a checkpoint and back (checkpoint.py: the files)
    runfiles.py   config.yaml, provenance.json, metrics.jsonl
    finish.py     the model export and done.json
    trainer.py    this file: the order of it all, and the loop

Restart safety: checkpoints every `checkpoint_every` steps and on SIGTERM/SIGUSR2 (at the next step boundary),
holding everything a bit-identical continuation needs (see resume.py); a rerun resumes from the newest. A
non-finite loss, statistic or gradient norm stops the run *before* the optimiser step, so the last
checkpoint stays the last good state. Under submitit, after the checkpoint the signal is handed on to
submitit's own handler, which requeues the job.

Run folder: config.yaml, provenance.json, metrics.jsonl, error_curve.jsonl (with `error.every`, see
neuclip/error_study/tracking.py), checkpoints/, model/ (open_clip local-dir export) and done.json, written last.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from neuclip.train import checkpoint as ckpt
from neuclip.train import resume
from neuclip.train.config import ConfigError
from neuclip.train.data import expand_shards
from neuclip.train.finish import DONE_FILE, export_model, write_done
from neuclip.train.runfiles import (
    CURVE_FILE,
    METRICS_FILE,
    MetricsLog,
    check_config,
    last_logged,
    truncate_log,
    write_config,
    write_provenance,
)
from neuclip.train.runtime import (
    Process,
    Signals,
    pick_device,
    precision,
    run_lock,
    seed_everything,
    setup_distributed,
    wants_cuda,
)
from neuclip.train.setup import Geometry, buffer_sync, build_parts, make_data, make_loader, wrap_ddp
from neuclip.train.step import Stepper, TrainingDiverged

__all__ = ["EXIT_PREEMPTED", "Preempted", "TrainingDiverged", "train"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun to resume


class Preempted(RuntimeError):
    """Stopped by SIGTERM/SIGUSR2 after writing a checkpoint."""


def _curve_has(run_dir: Path, step: int) -> bool:
    """Whether RUN/error_curve.jsonl holds the measurement at `step` (every rank reads it: same answer)."""
    try:
        lines = (run_dir / CURVE_FILE).read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            if json.loads(line).get("step") == step:
                return True
        except ValueError:
            continue
    return False


class NoTracking:
    """The tracker hook when none is given: never due."""

    def due(self, step: int, total: int) -> bool:
        return False

    def __call__(self, step: int, epoch: float, model) -> None:  # pragma: no cover - never due
        raise AssertionError("NoTracking is never due")


def train(cfg: dict, tracker_factory=None) -> dict:
    """Start or resume the run described by the *resolved* config `cfg`; return done.json's content.

    `tracker_factory(cfg, parts, shards, proc, bf16)` builds the error tracker hook (`due(step, total)`,
    `tracker(step, epoch, model)`) that the loop calls; the error study passes it (neuclip/error_study/tracking.py
    `train`, what a train job runs), so the trainer never imports the error study. Without one, a config asking
    for error.every is refused rather than trained without its measurements."""
    if tracker_factory is None and cfg["error"]["every"]:
        raise ConfigError("error.every is set but no error tracker was given: start the run with `neuclip train` "
                          "or neuclip.error_study.tracking.train")
    run_dir = Path(cfg["run_dir"])
    done_path = run_dir / DONE_FILE
    if done_path.exists():
        return json.loads(done_path.read_text())
    # the other ranks wait at a barrier while rank 0 measures the normaliser error (error.every), which on a
    # few million samples can outlast the usual 30 min collective timeout
    timeout_min = 120 if cfg["error"]["every"] else 30
    rank, world, local_rank = setup_distributed("cuda" if wants_cuda(cfg) else "cpu", timeout_min)
    try:
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        if world > 1:
            dist.barrier()
        lock = run_lock(run_dir) if rank == 0 else contextlib.nullcontext()
        with lock, Signals() as signals:
            return _Trainer(cfg, rank, world, local_rank, signals, tracker_factory).run()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _Trainer:
    """One attempt at a run: set up (restoring the newest checkpoint), loop, finish."""

    def __init__(self, cfg: dict, rank: int, world: int, local_rank: int, signals: Signals, tracker_factory=None):
        self.cfg, self.signals, self.tracker_factory = cfg, signals, tracker_factory
        self.run_dir = Path(cfg["run_dir"])
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.proc = Process(rank, world, pick_device(cfg, local_rank))
        self.precision = precision(cfg, self.proc.device)
        self.geo = Geometry.of(cfg, world)  # fail fast on the config; the epoch length follows from the data
        self.train_wall_s = 0.0

    def run(self) -> dict:
        cfg, proc = self.cfg, self.proc
        if cfg["train"]["threads"]:
            torch.set_num_threads(cfg["train"]["threads"])
        if proc.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temps(self.ckpt_dir)
            check_config(self.run_dir, cfg)
        proc.barrier()

        shards = expand_shards(cfg["data"]["train_shards"])
        data = make_data(cfg, shards, proc)
        self.geo = Geometry.of(cfg, proc.world, num_samples=data.num_samples)
        seed_everything(cfg["seed"])
        self.parts = build_parts(cfg, self.geo, proc.device)
        factory, bf16 = self.tracker_factory, self.precision == "bf16"
        self.tracker = factory(cfg, self.parts, shards, proc, bf16=bf16) if factory else NoTracking()
        if proc.rank == 0:  # the start-up checks passed: now the folder holds this run
            write_config(self.run_dir, cfg)
        start, bad_decoded, self.train_wall_s = resume.load(self.ckpt_dir, cfg, self.geo, proc, self.parts, data)
        self.last_saved = start
        if proc.rank == 0:
            for name in (METRICS_FILE, CURVE_FILE):
                truncate_log(self.run_dir / name, start)
            write_provenance(
                self.run_dir,
                cfg["seed"],
                resumed_from=start,
                world=proc.world,
                device=proc.device,
                precision=self.precision,
            )
        self.loader = make_loader(cfg, data, proc, start, bad_decoded, self.parts)
        try:
            last = self._loop(start, wrap_ddp(self.parts.model, proc, cfg["train"]["batchnorm"]))
        finally:
            self.loader.close()
        return self._finish(last)

    def _loop(self, start: int, ddp: torch.nn.Module) -> dict:
        """Steps `start` .. total; returns the last logged metrics line ({} if none was logged)."""
        t, parts, (total, spe) = self.cfg["train"], self.parts, (self.geo.total_steps, self.geo.steps_per_epoch)
        stepper = Stepper(
            ddp,
            parts.estimator,
            parts.optimizer,
            cfg=self.cfg,
            world=self.proc.world,
            device=self.proc.device,
            bf16=self.precision == "bf16",
            total_steps=total,
            steps_per_epoch=spe,
            ckpt_dir=self.ckpt_dir,
            sync_buffers=buffer_sync(parts.model, self.proc, self.cfg["train"]["batchnorm"]),
        )
        log = MetricsLog(self.run_dir, self.proc.rank, self.geo.batch, total, start, self.cfg)
        parts.model.train()
        step = start
        try:
            if 0 < start < total and self.tracker.due(start, total) and not _curve_has(self.run_dir, start):
                self._measure(start, log)  # the last attempt stopped during it (its checkpoint came first)
            while step < total:
                step_t0 = time.perf_counter()
                if step % spe == 0:
                    parts.estimator.on_epoch_start(step // spe)
                images, texts, ids = self.loader.next_batch()
                log.data_s += time.perf_counter() - step_t0
                out = stepper(images, texts, ids, step, self.signals.requested)
                step += 1
                self.train_wall_s += time.perf_counter() - step_t0
                log.stepped()
                if step % t["log_every"] == 0 or step == total:
                    tau, lr = float(parts.estimator.temperature()), parts.optimizer.param_groups[0]["lr"]
                    log.write(
                        step,
                        step / spe,
                        out.loss,
                        tau,
                        lr,
                        out.grad_norm,
                        bad_counts=self.loader.bad_counts(),
                        stats=out.stats,
                    )
                if out.stop and step < total:
                    self._preempt(step)  # before a due measurement: the resume measures at this step
                if self.tracker.due(step, total):
                    self._measure(step, log)
                if step < total and step % t["checkpoint_every"] == 0 and self.last_saved != step:
                    self._save(step)
                    # a signal that landed during the write stops here, with no further step or write
                    if not self.proc.all_ok(not self.signals.requested()):
                        self._preempt(step)
        finally:
            log.close()
        return log.last

    def _measure(self, step: int, log) -> None:
        """The error measurement at `step`, kept out of the logged samples/s. Before the last step it is
        interruptible (preemption, slurm/README.md): the step's checkpoint is written first, so a signal during
        the measurement stops at once and the next attempt measures again; the USR2 delay need only cover a
        step and a checkpoint write. The last step's comes before the final checkpoint, which thus implies it."""
        with log.paused():
            if step == self.geo.total_steps:
                self.tracker(step, step / self.geo.steps_per_epoch, self.parts.model)
                return
            if self.last_saved != step:
                self._save(step)
            if not self.proc.all_ok(not self.signals.requested()):
                self._preempt(step)  # a signal during the write: do not start the measurement
            try:
                with self.signals.interruptible():
                    self.tracker(step, step / self.geo.steps_per_epoch, self.parts.model)
            except Exception:  # Interrupted, or a collective broken by a peer that stopped
                if not self.signals.requested():
                    raise
                self._preempt(step)

    def _save(self, step: int) -> None:
        resume.save(self.ckpt_dir, step, self.cfg, self.geo, self.proc, self.parts, self.loader, self.train_wall_s)
        self.last_saved = step

    def _preempt(self, step: int) -> None:
        if self.last_saved != step:
            self._save(step)
        msg = f"stopped by {self.signals.name()} at step {step}; checkpoint written in {self.ckpt_dir}; rerun to resume"
        print(f"neuclip train: {msg}", file=sys.stderr, flush=True)
        self.loader.close()
        self.signals.forward()  # submitit: rank 0 requeues and exits here
        raise Preempted(msg)

    def _finish(self, last: dict) -> dict:
        total = self.geo.total_steps
        if self.last_saved != total:
            self._save(total)
        bad = self.loader.bad_counts()  # collective: every rank's undecodable images
        self.signals.restore()  # from here a signal goes straight to submitit (requeue -> resume -> export)
        done: dict = {}
        if self.proc.rank == 0:
            export_model(self.parts, self.cfg["model"], self.run_dir / "model")
            done = write_done(
                self.run_dir,
                self.cfg,
                self.geo,
                self.parts,
                last=last or last_logged(self.run_dir),
                bad=bad,
                train_wall_s=self.train_wall_s,
            )
        if self.proc.world > 1:
            dist.barrier()
            done = self.proc.gather(done)[0]
        return done
