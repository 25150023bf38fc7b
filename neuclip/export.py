"""Models in open_clip's own `local-dir:` format, so clip_benchmark and open_clip load them unchanged.

A model folder holds `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and
`open_clip_model.safetensors`. `open_clip.create_model_and_transforms("local-dir:DIR")` reads it, and so does
`clip_benchmark --model local-dir:DIR`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch

from neuclip.atomic import DIR_MODE, write_atomic, write_json

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Register the repo's small CPU model configs (e.g. `tiny-vit`) with open_clip, once."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def create_model(name: str, device: str | torch.device = "cpu"):
    """(model, train_transform, eval_transform, tokenizer) for an open_clip model name or `local-dir:DIR`."""
    register_model_configs()
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    return model, train_tf, eval_tf, open_clip.get_tokenizer(name)


def save_model(model: torch.nn.Module, model_name: str, out_dir: str | os.PathLike) -> Path:
    """Write `model` (an open_clip CLIP built from `model_name`) as a `local-dir:` folder, atomically: both
    files are written (through neuclip/atomic.py) into a temp folder beside `out_dir`, which then replaces it."""
    from safetensors.torch import save

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise KeyError(f"open_clip knows no model config named {model_name!r}")
    visual = getattr(model, "visual", None)
    preprocess = {
        "size": cfg["vision_cfg"].get("image_size", 224),
        "mean": list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        "std": list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(DIR_MODE)  # mkdtemp's 0o700 would hide the model from other users
        write_json(tmp / "open_clip_config.json", {"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2)
        write_atomic(tmp / "open_clip_model.safetensors", save(state))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`, moving an existing `target` aside first (Linux cannot swap two folders in
    one step). A crash in between leaves no `target` and a `.old` folder, which the next call clears."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, eval_transform, tokenizer) from a folder written by `save_model`."""
    model, _, eval_tf, tok = create_model(f"local-dir:{Path(model_dir).resolve()}", device=device)
    model.eval()
    return model, eval_tf, tok
