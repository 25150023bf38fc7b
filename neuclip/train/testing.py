"""Helpers shared by the trainer's tests and `neuclip bench trainer`: a tiny CPU run config and checkpoint
comparison. Not used by training itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from neuclip.cli import main
from neuclip.train import checkpoint as ckpt
from neuclip.train import resume
from neuclip.train.config import load_config, resolve


def train_pattern(data: str | Path) -> str:
    """The brace pattern of a synthetic data set's train shards (data.train_shards), as `neuclip data synth`
    declares it in DATA/train/dataset.yaml; the tests' one way to name the shard set of their `synth_data`."""
    train = Path(data) / "train"
    return str(train / yaml.safe_load((train / "dataset.yaml").read_text())["shards"])


def tiny_overrides(run_dir: str | Path, shards: str, **extra) -> list[str]:
    """Overrides for a seconds-long CPU run of tiny-vit (16 samples a step, fp32, one thread)."""
    base = {
        "run_dir": str(run_dir),
        "model": "tiny-vit",
        "data.train_shards": shards,
        "data.shuffle_buffer": 32,
        "train.global_batch_size": 16,
        "train.max_steps": 12,
        "train.lr": 1e-3,
        "train.warmup_steps": 2,
        "train.checkpoint_every": 4,
        "train.log_every": 1,
        "train.threads": 1,
        "train.device": "cpu",
        "train.precision": "fp32",
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in base.items()
    ]


def tiny_config(run_dir: str | Path, shards: str, **extra) -> dict:
    """A resolved config; `extra` keys use `__` for dots (train__max_steps=20) or are dotted strings."""
    return resolve(load_config(None, tiny_overrides(run_dir, shards, **extra)))


def write_config(path: str | Path, cfg: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_checkpoint(folder: str | Path, step: int) -> dict:
    """A checkpoint with its per-sample state put back whole into "estimator" (from its shard files: id i of
    world W at slot i // W of shard i % W), for comparing runs of any layout."""
    state = torch.load(ckpt.checkpoint_path(folder, step), weights_only=True)
    info = state.get("estimator_shards")
    if info:
        world, n = int(info["world"]), int(info["data_size"])
        shards = [ckpt.load_shard(folder, step, r, world)["estimator"] for r in range(world)]
        for key in info["fills"]:
            whole = torch.empty(n, dtype=shards[0][key].dtype)
            for r, shard in enumerate(shards):
                whole[r::world] = shard[key]
            state["estimator"][key] = whole
    return state


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A floating tensor as its bit patterns, so NaN (an unvisited id's state) equals NaN and -0 differs from 0."""
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def tensors_equal(a, b, path: str = "") -> list[str]:
    """Paths at which two nested checkpoint structures differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [path]
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in tensors_equal(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tensors_equal(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def run_attempts(run_dir: Path) -> list[dict]:
    """The attempt records a run folder's provenance.json holds so far ([] while it is not written yet)."""
    try:
        return json.loads((Path(run_dir) / "provenance.json").read_text())["attempts"]
    except (OSError, ValueError):
        return []


def last_logged_step(run_dir: Path) -> int:
    """The step of the last metrics.jsonl line (0 while there is none)."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


RANK_DUMPS = "rank_states"  # RUN/rank_states/step_N.rankR.pt, written by `train_dumping_ranks`


def train_dumping_ranks(config_path: str) -> None:
    """`neuclip train CONFIG`, but every checkpoint also dumps *each rank's* model and estimator state_dict
    (a checkpoint holds rank 0's model only): tests compare ranks and runs with it. Run under torchrun as
    `python -m neuclip.train.testing CONFIG`."""
    import os


    real_save = resume.save

    def save(ckpt_dir, step, cfg, geo, proc, parts, loader, train_wall_s):
        out = Path(cfg["run_dir"]) / RANK_DUMPS
        out.mkdir(parents=True, exist_ok=True)
        state = {"model": parts.model.state_dict(), "estimator": parts.estimator.state_dict()}
        torch.save(state, out / f"step_{step}.rank{proc.rank}.pt")
        return real_save(ckpt_dir, step, cfg, geo, proc, parts, loader, train_wall_s)

    resume.save = save
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main(["train", config_path]))


if __name__ == "__main__":
    import sys

    train_dumping_ranks(sys.argv[1])
