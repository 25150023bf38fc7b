"""Models in open_clip's own `local-dir:` format, so clip_benchmark and open_clip load them unchanged.

A model folder holds `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and
`open_clip_model.safetensors`. `open_clip.create_model_and_transforms("local-dir:DIR")` reads it, and so does
`clip_benchmark --model local-dir:DIR`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import open_clip
import torch

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
    """Write `model` (an open_clip CLIP built from `model_name`) as a `local-dir:` folder, atomically."""
    from safetensors.torch import save_file

    register_model_configs()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise KeyError(f"open_clip knows no model config named {model_name!r}")
    visual = getattr(model, "visual", None)
    preprocess = {
        "size": cfg["vision_cfg"].get("image_size", 224),
        "mean": list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        "std": list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
    }
    (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "open_clip_model.safetensors"))
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        out_dir.rename(old)
        tmp.rename(out_dir)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(out_dir)
    return out_dir


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, eval_transform, tokenizer) from a folder written by `save_model`."""
    model, _, eval_tf, tok = create_model(f"local-dir:{Path(model_dir).resolve()}", device=device)
    model.eval()
    return model, eval_tf, tok
