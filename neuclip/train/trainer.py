"""The training loop: one function, `train(cfg)`, that starts or resumes the run in `cfg["run_dir"]`.

Per step: the local batch goes through the open_clip model (DDP-wrapped when distributed; bf16 autocast on
GPU), the *estimator* turns the L2-normalised local embeddings, sample ids, step and fractional epoch into a
loss (it gathers the global batch itself), backward, the estimator's own parameters' gradients are averaged
across ranks (they live outside DDP), gradients are clipped, the schedule sets each group's lr, AdamW steps,
then the estimator projects (clamps tau). The trainer knows nothing method-specific.

Restart safety: checkpoints every `checkpoint_every` steps and on SIGTERM/SIGUSR2 (at the next step boundary),
holding everything a bit-identical continuation needs (see `_state`); a rerun resumes from the newest. A
non-finite loss, statistic or gradient norm stops the run *before* the optimiser step, so the last
checkpoint stays the last good state. Under submitit, after the checkpoint the signal is handed on to
submitit's own handler, which requeues the job.

Run folder: config.yaml, provenance.json, metrics.jsonl, error_curve.jsonl (with `error.every`, see
neuclip/error_study/tracking.py), checkpoints/, model/ (open_clip local-dir export) and done.json, written last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from neuclip.error_study.tracking import CURVE_FILE, ErrorTracker
from neuclip.estimators.base import Batch
from neuclip.train import checkpoint as ckpt
from neuclip.train.config import ConfigError, dump, identity_diff, yaml_load
from neuclip.train.data import DataError, Loader, TrainStream, expand_shards, fresh_position, merged_positions
from neuclip.train.optim import build_optimizer, lr_multiplier, optimized_params, set_lr

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun to resume


class TrainingDiverged(RuntimeError):
    """A non-finite loss, estimator statistic or gradient norm."""


class Preempted(RuntimeError):
    """Stopped by SIGTERM/SIGUSR2 after writing a checkpoint."""


# -- small helpers ----------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _git_info() -> dict:
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip()), "repo": str(repo)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "repo": str(repo)}


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("neuclip-bench", "torch", "open_clip_torch", "numpy", "webdataset", "submitit", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class _Signals:
    """SIGTERM/SIGUSR2 set a flag; the loop checkpoints at the next step boundary, then `forward()` hands
    the signal to whoever handled it before us (submitit's requeue handler, when run by submitit)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)

    def __init__(self):
        self.signum: int | None = None
        self.prev: dict = {}

    def __enter__(self):
        self.pid = os.getpid()  # forked data-loader workers inherit the handler: they must not act on it
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.prev[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() == self.pid and self.signum is None:
            self.signum = signum
            print(
                f"neuclip train: got {signal.Signals(signum).name}; checkpointing at the next step boundary",
                file=sys.stderr,
                flush=True,
            )

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


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """One trainer per run folder (advisory flock; silently skipped where the file system lacks locks)."""
    import fcntl

    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another trainer is running in {run_dir} (its .lock is held); wait for it "
                "or stop it before starting this one"
            ) from None
        except OSError:
            pass  # no locking on this file system
        yield
    finally:
        os.close(fd)


def _setup_distributed(device_kind: str, timeout_min: int) -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=timeout_min))
    return rank, world, local_rank


def _device(cfg: dict, local_rank: int) -> torch.device:
    want = cfg["train"]["device"]
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is cuda but torch sees no GPU")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _embed_dim(model, model_name: str) -> int:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg and "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    return int(model.visual.output_dim)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (and a line cut in half by a kill)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    _atomic_write(path, "".join(k + "\n" for k in keep))


def _all_finite(stats: dict) -> str | None:
    for k, v in stats.items():
        if isinstance(v, (int, float)) and not math.isfinite(v):
            return k
    return None


# -- the run ----------------------------------------------------------------------------------------------


def train(cfg: dict) -> dict:
    """Start or resume the run described by the *resolved* config `cfg`; return done.json's content."""
    run_dir = Path(cfg["run_dir"])
    done_path = run_dir / "done.json"
    if done_path.exists():
        return json.loads(done_path.read_text())
    want_cuda = cfg["train"]["device"] == "cuda" or (
        cfg["train"]["device"] == "auto" and torch.cuda.is_available()
    )
    # the other ranks wait at a barrier while rank 0 measures the normaliser error (error.every), which on a
    # few million samples can outlast the usual 30 min collective timeout
    timeout_min = 120 if cfg["error"]["every"] else 30
    rank, world, local_rank = _setup_distributed("cuda" if want_cuda else "cpu", timeout_min)
    try:
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        if world > 1:
            dist.barrier()
        lock = _run_lock(run_dir) if rank == 0 else contextlib.nullcontext()
        with lock, _Signals() as signals:
            return _Trainer(cfg, rank, world, local_rank, signals).run()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _Trainer:
    def __init__(self, cfg: dict, rank: int, world: int, local_rank: int, signals: _Signals):
        self.cfg, self.rank, self.world, self.signals = cfg, rank, world, signals
        self.run_dir = Path(cfg["run_dir"])
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = _device(cfg, local_rank)
        t = cfg["train"]
        self.precision = (
            t["precision"] if t["precision"] != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        )
        d = cfg["data"]
        self.B = t["global_batch_size"]
        self.workers = d["workers"]
        self.num_slots = world * max(1, self.workers)
        if self.B % self.num_slots:
            raise ConfigError(
                f"train.global_batch_size ({self.B}) must be divisible by world size x "
                f"max(1, data.workers) = {world} x {max(1, self.workers)} = {self.num_slots}"
            )
        self.steps_per_epoch = max(1, d["train_num_samples"] // self.B)
        if t["max_steps"] is not None:
            self.total_steps = int(t["max_steps"])
        else:
            self.total_steps = max(1, round(t["epochs"] * self.steps_per_epoch))
        self.train_wall_s = 0.0

    # -- bookkeeping files ---------------------------------------------------------------------------
    def _write_config(self) -> None:
        path = self.run_dir / "config.yaml"
        if path.exists():
            old = yaml_load(path.read_text())
            try:
                diff = identity_diff(old, self.cfg)
            except (KeyError, TypeError):
                diff = ["(unreadable config.yaml)"]
            if diff:
                raise ConfigError(
                    f"{self.run_dir} holds a run with a different config ({'; '.join(diff)}); "
                    "use a new run_dir, or delete this one to start over"
                )
        _atomic_write(path, dump(self.cfg))

    def _write_provenance(self, resumed_from: int) -> None:
        path = self.run_dir / "provenance.json"
        prov = (
            json.loads(path.read_text())
            if path.exists()
            else {
                "git": _git_info(),
                "versions": _versions(),
                "seed": self.cfg["seed"],
                "created": _now(),
                "attempts": [],
            }
        )
        prov["attempts"].append(
            {
                "started": _now(),
                "resumed_from_step": resumed_from,
                "hostname": socket.gethostname(),
                "command": sys.argv,
                "pid": os.getpid(),
                "world_size": self.world,
                "device": str(self.device),
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                "precision": self.precision,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "git": _git_info(),
            }
        )
        _atomic_write(path, json.dumps(prov, indent=2) + "\n")

    # -- checkpoint ----------------------------------------------------------------------------------
    def _gather(self, obj):
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _save(self, step: int) -> Path | None:
        """Collective: every rank contributes its RNG and data position; rank 0 writes."""
        rngs = self._gather(ckpt.rng_state())
        positions = merged_positions(self.loader.positions, self.num_slots)
        path = None
        if self.rank == 0:
            state = {
                "format": 1,
                "step": step,
                "epoch": step / self.steps_per_epoch,
                "config": self.cfg,
                "model": _unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {
                    "step": step,
                    "total_steps": self.total_steps,
                    "warmup_steps": self.cfg["train"]["warmup_steps"],
                },
                "estimator": self.estimator.state_dict(),
                "rng": rngs,
                "data": {"num_slots": self.num_slots, "positions": positions},
                "world_size": self.world,
                "train_wall_s": self.train_wall_s,
            }
            path = ckpt.save(self.ckpt_dir, step, state, self.cfg["train"]["keep_last"])
        if self.world > 1:
            dist.barrier()
        self.last_saved = step
        return path

    def _load(self) -> tuple[int, list[dict]]:
        found = ckpt.load_latest(self.ckpt_dir)
        if found is None:
            return 0, [fresh_position() for _ in range(self.num_slots)]
        path, state = found
        diff = identity_diff(state["config"], self.cfg)
        if diff:
            raise ConfigError(
                f"checkpoint {path} was written with a different config ({'; '.join(diff)}); "
                "use a new run_dir"
            )
        if state["data"]["num_slots"] != self.num_slots:
            raise ConfigError(
                f"checkpoint {path} read the data with {state['data']['num_slots']} slots (world "
                f"size x data.workers); this run has {self.num_slots}: keep world size x "
                "max(1, data.workers) unchanged to resume"
            )
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.estimator.load_state_dict(state["estimator"])
        rngs = state["rng"]
        if len(rngs) != self.world and self.rank == 0:
            print(
                f"neuclip train: checkpoint has {len(rngs)} ranks' RNG states, this run {self.world} ranks: "
                "the continuation will not be bit-identical",
                file=sys.stderr,
                flush=True,
            )
        ckpt.set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        self.train_wall_s = float(state.get("train_wall_s", 0.0))
        if self.rank == 0:
            print(f"neuclip train: resumed from {path} (step {state['step']})", file=sys.stderr, flush=True)
        return int(state["step"]), [dict(p) for p in state["data"]["positions"]]

    # -- main ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        from neuclip.estimators.base import EstimatorContext
        from neuclip.estimators.registry import build_estimator
        from neuclip.export import create_model

        cfg, t, d = self.cfg, self.cfg["train"], self.cfg["data"]
        if t["threads"]:
            torch.set_num_threads(t["threads"])
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temps(self.ckpt_dir)
            self._write_config()
        if self.world > 1:
            dist.barrier()

        _seed_everything(cfg["seed"])
        model, train_tf, eval_tf, tokenizer = create_model(cfg["model"], device=self.device)
        for name in ("logit_scale", "logit_bias"):  # the estimator owns the temperature (and SigLIP's bias)
            p = getattr(model, name, None)
            if isinstance(p, torch.nn.Parameter):
                p.requires_grad_(False)
        ctx = EstimatorContext(
            embed_dim=_embed_dim(model, cfg["model"]),
            data_size=d["data_size"],
            total_epochs=self.total_steps / self.steps_per_epoch,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.model = model
        self.estimator = build_estimator(
            cfg["method"]["name"], cfg["method"]["options"], ctx, common=cfg["method"].get("common_options")
        ).to(self.device)
        self.optimizer = build_optimizer(model, self.estimator, t)
        self.est_params = [p for g in self.estimator.param_groups() for p in g["params"] if p.requires_grad]

        shards = expand_shards(d["train_shards"])
        self.error_tracker = ErrorTracker(
            cfg, self.estimator, shards, self.rank, self.world, self.precision == "bf16", ctx.embed_dim,
            eval_tf, tokenizer, self.device,
        )

        start, positions = self._load()
        self.last_saved = start
        if self.rank == 0:
            for name in ("metrics.jsonl", CURVE_FILE):
                _truncate_metrics(self.run_dir / name, start)
            self._write_provenance(start)

        stream = TrainStream(
            shards,
            seed=cfg["seed"],
            rank=self.rank,
            world_size=self.world,
            workers=self.workers,
            chunk_size=self.B // self.num_slots,
            positions=positions,
            shuffle_buffer=d["shuffle_buffer"],
            skip_bad=d["skip_bad"],
            transform=train_tf,
            tokenizer=tokenizer,
        )
        self.loader = Loader(stream, pin_memory=self.device.type == "cuda")
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        else:
            self.ddp = model
        try:
            last = self._loop(start)
        finally:
            self.loader.close()
        return self._finish(last)

    def _loop(self, start: int) -> dict:
        t = self.cfg["train"]
        total, spe = self.total_steps, self.steps_per_epoch
        clip = float(t["grad_clip"]) if t["grad_clip"] else math.inf
        params = optimized_params(self.optimizer)
        bf16 = self.precision == "bf16"
        metrics = open(self.run_dir / "metrics.jsonl", "a") if self.rank == 0 else None  # noqa: SIM115
        bar = None
        if self.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        last: dict = {}
        window_start, window_steps, data_s = time.perf_counter(), 0, 0.0
        self.model.train()
        step = start
        try:
            while step < total:
                step_t0 = time.perf_counter()
                if step % spe == 0:
                    self.estimator.on_epoch_start(step // spe)
                images, texts, ids = self.loader.next_batch()
                data_s += time.perf_counter() - step_t0
                if int(ids.max()) >= self.cfg["data"]["data_size"]:
                    raise DataError(
                        f"sample id {int(ids.max())} >= data.data_size "
                        f"({self.cfg['data']['data_size']}): set data.data_size to max id + 1"
                    )
                images = images.to(self.device, non_blocking=True)
                texts = texts.to(self.device, non_blocking=True)
                ids = ids.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = self.ddp(images, texts)
                image_f, text_f = (
                    (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
                )
                result = self.estimator(
                    Batch(image=image_f.float(), text=text_f.float(), ids=ids, step=step, epoch=step / spe)
                )
                self.optimizer.zero_grad(set_to_none=True)
                result.loss.backward()
                if self.world > 1:
                    for p in self.est_params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        dist.all_reduce(p.grad)
                        p.grad.div_(self.world)
                if math.isfinite(clip):
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                else:  # no clipping: only the norm (for the log and the divergence check)
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                bad_stat = _all_finite(result.stats)
                flags = torch.stack(
                    [
                        result.loss.detach().float().reshape(()),
                        torch.tensor(float(bad_stat is not None), device=result.loss.device),
                        torch.tensor(float(self.signals.signum is not None), device=result.loss.device),
                    ]
                ).to(self.device)
                if self.world > 1:
                    dist.all_reduce(flags)
                    flags[0] /= self.world
                loss, any_bad_stat, stop = float(flags[0]), float(flags[1]) > 0, float(flags[2]) > 0
                gn = float(grad_norm)
                where = f"at step {step + 1} (epoch {(step + 1) / spe:.3f})"
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} {where}; the last good checkpoint is kept in {self.ckpt_dir}"
                    )
                if any_bad_stat:
                    name = bad_stat or "(on another rank)"
                    raise TrainingDiverged(
                        f"estimator statistic {name!r} is "
                        f"{result.stats.get(name)} {where}; the last good checkpoint is kept "
                        f"in {self.ckpt_dir}"
                    )
                if not math.isfinite(gn):
                    raise TrainingDiverged(
                        f"gradient norm is {gn} {where}; the last good checkpoint is kept in {self.ckpt_dir}"
                    )
                mult = lr_multiplier(step, t["warmup_steps"], total)
                set_lr(self.optimizer, mult, self.estimator.lr_factors())
                self.optimizer.step()
                self.estimator.after_optimizer_step()
                step += 1
                window_steps += 1
                self.train_wall_s += time.perf_counter() - step_t0
                if bar is not None:
                    bar.update(1)
                if step % t["log_every"] == 0 or step == total:
                    now = time.perf_counter()
                    last = {
                        "step": step,
                        "epoch": step / spe,
                        "loss": loss,
                        "tau": float(self.estimator.temperature()),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "samples_per_s": self.B * window_steps / max(now - window_start, 1e-9),
                        "data_s": data_s / window_steps,
                        "grad_norm": gn,
                        **self.loader.bad_counts(),
                    }
                    for k, v in result.stats.items():
                        last[k if k not in last else f"est_{k}"] = v
                    if metrics is not None:
                        metrics.write(json.dumps(last) + "\n")
                        metrics.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", tau=f"{last['tau']:.4f}")
                    window_start, window_steps, data_s = now, 0, 0.0
                if self.error_tracker.due(step, total):  # before the checkpoint: a resume never repeats it
                    t_err = time.perf_counter()
                    self.error_tracker(step, step / spe, _unwrap(self.model))
                    window_start += time.perf_counter() - t_err  # keep it out of the logged samples/s
                if step < total and step % t["checkpoint_every"] == 0:
                    self._save(step)
                if stop and step < total:
                    self._preempt(step)
        finally:
            if metrics is not None:
                metrics.close()
            if bar is not None:
                bar.close()
        return last

    def _preempt(self, step: int) -> None:
        if self.last_saved != step:
            self._save(step)
        signum = self.signals.signum
        name = signal.Signals(signum).name if signum else "signal"
        msg = f"stopped by {name} at step {step}; checkpoint written in {self.ckpt_dir}; rerun to resume"
        print(f"neuclip train: {msg}", file=sys.stderr, flush=True)
        self.loader.close()
        self.signals.forward()  # submitit: rank 0 requeues and exits here
        raise Preempted(msg)

    def _finish(self, last: dict) -> dict:
        total = self.total_steps
        if self.last_saved != total:
            self._save(total)
        bad = {
            k: sum(p[k] for p in merged_positions(self.loader.positions, self.num_slots))
            for k in ("bad_samples", "bad_shards")
        }
        self.signals.restore()  # from here a signal goes straight to submitit (requeue -> resume -> export)
        done: dict = {}
        if self.rank == 0:
            from neuclip.export import save_model

            model = _unwrap(self.model)
            with torch.no_grad():
                model.logit_scale.fill_(math.log(1.0 / float(self.estimator.temperature())))
                bias = getattr(self.estimator, "logit_bias", None)
                if isinstance(getattr(model, "logit_bias", None), torch.Tensor) and isinstance(
                    bias, torch.Tensor
                ):
                    model.logit_bias.copy_(bias.detach().reshape(model.logit_bias.shape))
            save_model(model, self.cfg["model"], self.run_dir / "model")
            if not last:
                path = self.run_dir / "metrics.jsonl"
                lines = path.read_text().splitlines() if path.exists() else []
                last = json.loads(lines[-1]) if lines else {}
            done = {
                "status": "done",
                "method": self.cfg["method"]["name"],
                "model": self.cfg["model"],
                "steps": total,
                "epochs": total / self.steps_per_epoch,
                "samples_seen": total * self.B,
                "final_loss": last.get("loss"),
                "final_tau": float(self.estimator.temperature()),
                **bad,
                "train_wall_s": round(self.train_wall_s, 3),
                "model_dir": "model",
                "checkpoint": ckpt.checkpoint_path(self.ckpt_dir, total).name,
                "finished": _now(),
            }
            _atomic_write(self.run_dir / "done.json", json.dumps(done, indent=2) + "\n")
        if self.world > 1:
            dist.barrier()
            done = self._gather(done)[0]
        return done
