"""The run folder's bookkeeping files: config.yaml (the run's identity), provenance.json (one record per
attempt) and metrics.jsonl (one line every `log_every` steps, with the progress bar and samples/s window
that go with it). All whole-file writes go through neuclip/atomic.py.

`train.report_to` adds mirrors of metrics.jsonl and error_curve.jsonl, which stay the source of truth:
TensorBoard (RUN/tensorboard, torch's SummaryWriter, tags train/<key> and error/<key>) and W&B (RUN/wandb,
offline unless WANDB_MODE says otherwise, the same keys). Both are optional packages (the `tracking` extra).
The error tracker appends its line after the step's log line; it is forwarded at the next step, and when the
log closes (a preemption too). A resume restarts both at the checkpoint's step: TensorBoard hides the dead
attempt's later events (purge_step), W&B continues the same run id."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from neuclip.atomic import write_atomic, write_json
from neuclip.train.config import ConfigError, dump, identity_diff, yaml_load

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "error_curve.jsonl"  # the normaliser error measured during training (neuclip/error_study/tracking.py)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_config(run_dir: Path, cfg: dict) -> None:
    """A folder whose config.yaml holds a run with a different identity is an error (it is never overwritten)."""
    path = run_dir / "config.yaml"
    if path.exists():
        old = yaml_load(path.read_text())
        try:
            diff = identity_diff(old, cfg)
        except (KeyError, TypeError):
            diff = ["(unreadable config.yaml)"]
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({'; '.join(diff)}); "
                "use a new run_dir, or delete this one to start over"
            )


def write_config(run_dir: Path, cfg: dict) -> None:
    """config.yaml, the run's identity, after `check_config`. The trainer writes it only once the start-up checks
    (data, model, estimator) have passed, so a run refused at start leaves none behind to refuse the corrected
    rerun in the same folder."""
    check_config(run_dir, cfg)
    write_atomic(run_dir / "config.yaml", dump(cfg))


def _git_info() -> dict:
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
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


def write_provenance(run_dir: Path, seed: int, *, resumed_from: int, world: int, device, precision: str) -> None:
    """provenance.json: created once (git state, versions, seed), plus one record per attempt."""
    path = run_dir / "provenance.json"
    if path.exists():
        prov = json.loads(path.read_text())
    else:
        prov = {"git": _git_info(), "versions": _versions(), "seed": seed, "created": now(), "attempts": []}
    prov["attempts"].append(
        {
            "started": now(),
            "resumed_from_step": resumed_from,
            "hostname": socket.gethostname(),
            "command": sys.argv,
            "pid": os.getpid(),
            "world_size": world,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "precision": precision,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "git": _git_info(),
        }
    )
    write_json(path, prov, indent=2)


def truncate_log(path: Path, step: int) -> None:
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
    write_atomic(path, "".join(k + "\n" for k in keep))


def last_logged(run_dir: Path) -> dict:
    """metrics.jsonl's last line ({} while there is none)."""
    path = run_dir / METRICS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


class MetricsLog:
    """metrics.jsonl (rank 0 only), the progress bar (on a terminal) and the samples/s window.

    The window's clock starts at the last logged line; `paused()` keeps time spent in it (the error
    measurement) out of the logged samples/s."""

    def __init__(self, run_dir: Path, rank: int, batch: int, total: int, start: int, cfg: dict | None = None):
        self.batch, self.last = batch, {}
        self.file = open(run_dir / METRICS_FILE, "a") if rank == 0 else None  # noqa: SIM115
        report_to = ((cfg or {}).get("train") or {}).get("report_to") or []
        self.mirrors = Mirrors(run_dir, report_to, start, cfg) if rank == 0 else None
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        self.window_start, self.window_steps, self.data_s = time.perf_counter(), 0, 0.0

    def stepped(self) -> None:
        self.window_steps += 1
        if self.mirrors is not None:
            self.mirrors.poll_curve()
        if self.bar is not None:
            self.bar.update(1)

    def write(
        self,
        step: int,
        epoch: float,
        loss: float,
        tau: float,
        lr: float,
        grad_norm: float,
        *,
        bad_counts: dict,
        stats: dict,
    ) -> dict:
        """One line: progress, the window's speed, the loader's bad counts and the estimator's `stats`
        (renamed est_<k> where a name clashes)."""
        now = time.perf_counter()
        self.last = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "tau": tau,
            "lr": lr,
            "samples_per_s": self.batch * self.window_steps / max(now - self.window_start, 1e-9),
            "data_s": self.data_s / self.window_steps,
            "grad_norm": grad_norm,
            **bad_counts,
        }
        for k, v in stats.items():
            self.last[k if k not in self.last else f"est_{k}"] = v
        if self.file is not None:
            self.file.write(json.dumps(self.last) + "\n")
            self.file.flush()
        if self.mirrors is not None:
            self.mirrors.log("train", self.last)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tau=f"{tau:.4f}")
        self.window_start, self.window_steps, self.data_s = now, 0, 0.0
        return self.last

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - t0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.mirrors is not None:
            self.mirrors.close()
        if self.bar is not None:
            self.bar.close()


MISSING = {
    "tensorboard": "train.report_to has tensorboard but the tensorboard package is missing: pip install tensorboard "
    "(or neuclip-bench[tracking]), or drop it from train.report_to",
    "wandb": "train.report_to has wandb but the wandb package is missing: pip install wandb "
    "(or neuclip-bench[tracking]), or drop it from train.report_to",
}


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics/error-curve line (step is the x axis, not a scalar)."""
    number = (int, float)
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, number) and not isinstance(v, bool)}


class Mirrors:
    """TensorBoard and W&B copies of metrics.jsonl lines and of error_curve.jsonl as it grows (rank 0)."""

    def __init__(self, run_dir: Path, report_to: list[str], start: int, cfg: dict | None):
        self.curve, self.curve_pos, self.tb, self.wandb = run_dir / CURVE_FILE, 0, None, None
        if self.curve.exists():  # lines up to the checkpoint were forwarded by the attempt that wrote them
            self.curve_pos = self.curve.stat().st_size
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(MISSING["tensorboard"]) from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError(MISSING["wandb"]) from None
            ident = "neuclip-" + hashlib.blake2b(str(run_dir.resolve()).encode(), digest_size=6).hexdigest()
            (run_dir / "wandb").mkdir(exist_ok=True)
            self.wandb = wandb.init(
                dir=str(run_dir), id=ident, resume="allow", name=run_dir.name, config=cfg or {},
                mode=os.environ.get("WANDB_MODE", "offline"), project=os.environ.get("WANDB_PROJECT", "neuclip"),
                settings=wandb.Settings(console="off", silent=True),
            )  # fmt: skip

    def log(self, prefix: str, record: dict) -> None:
        step, values = int(record["step"]), scalars(record)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def poll_curve(self) -> None:
        """Forward the error curve's new complete lines (a stat per step while nothing changed)."""
        if not self.curve.exists() or self.curve.stat().st_size == self.curve_pos:
            return
        with open(self.curve, "rb") as f:
            f.seek(self.curve_pos)
            data = f.read()
        done = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        for line in data[:done].splitlines():
            self.log("error", json.loads(line))
        self.curve_pos += done

    def close(self) -> None:
        self.poll_curve()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
