"""Where each task's data lives under --data-root, how to check it is there, how to get it, how to load it.

Layouts (DataComp's `download_evalsets.py` writes exactly these, so one DataComp download serves every suite):
    DATA_ROOT/wds_<name>_test/{test/{nshards.txt,0.tar,...}, classnames.txt,
                               zeroshot_classification_templates.txt}          clip_benchmark `wds/` sets
    DATA_ROOT/hf_cache/nlphuji___<name>/...                                    Hugging Face `datasets` cache
The tiny suite's data root is a `neuclip data synth` folder (sets under eval/wds_synth_*).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuclip.data.shards import IMAGE_EXTS
from neuclip.eval.suites import Task

IMAGE_EXTENSIONS = list(IMAGE_EXTS)  # the project's one list (clip_benchmark's wds loader accepts the same four)


@dataclass(frozen=True)
class Missing:
    task: Task
    path: Path  # the first thing found missing
    problem: str
    fix: str  # the command that gets the data


def hf_cache_dir(data_root: Path, task: Task) -> Path:
    """The `datasets` cache folder of an `nlphuji/<name>` set: `<cache_dir>/nlphuji___<name>`."""
    return data_root / "hf_cache" / task.dataset.replace("/", "___")


def datasets_installed() -> bool:
    """Whether Hugging Face `datasets` (needed for Flickr30k, MSCOCO, WinoGAViL; not a dependency) imports."""
    return importlib.util.find_spec("datasets") is not None


def download_command(task: Task, data_root: Path) -> str:
    root = shlex.quote(str(data_root))
    if task.id.startswith("synth_"):
        return f"neuclip data synth {root}"
    if task.source == "hf":
        cache = str(data_root / "hf_cache")
        code = f"import datasets; datasets.load_dataset({task.dataset!r}, split='test', cache_dir={cache!r})"
        return f'pip install datasets && python -c "{code}"'
    target = shlex.quote(str(data_root / task.folder))
    return f"hf download djghosh/{task.folder} --repo-type dataset --local-dir {target}"


def check_task(task: Task, data_root: Path) -> Missing | None:
    """None when the task's data looks complete, else what is missing (files only, nothing is read)."""
    fix = download_command(task, data_root)
    if task.source == "hf":
        folder = hf_cache_dir(data_root, task)
        if not folder.is_dir() or not any(folder.iterdir()):
            return Missing(task, folder, "not found (Hugging Face datasets cache)", fix)
        if not datasets_installed():
            return Missing(task, folder, "present, but the `datasets` package is not installed", "pip install datasets")
        return None
    root = data_root / task.folder
    nshards_file = root / "test" / "nshards.txt"
    if not nshards_file.is_file():
        return Missing(task, nshards_file if root.is_dir() else root, "not found", fix)
    try:
        nshards = int(nshards_file.read_text().strip())
    except ValueError:
        return Missing(task, nshards_file, "does not hold a shard count", fix)
    for i in range(nshards):
        if not (root / "test" / f"{i}.tar").is_file():
            return Missing(task, root / "test" / f"{i}.tar", f"not found ({nshards} shards expected)", fix)
    needed = ["dataset_type.txt"] if task.kind == "retrieval" else ["classnames.txt"]
    needed += [] if task.kind == "retrieval" else ["zeroshot_classification_templates.txt"]
    for name in needed:
        if not (root / name).is_file():
            return Missing(task, root / name, "not found", fix)
    return None


def format_missing(suite: str, data_root: Path, missing: list[Missing], total: int) -> str:
    lines = [
        f"suite {suite!r}: {len(missing)} of {total} data sets missing under {data_root}; nothing was evaluated.",
    ]
    for m in missing:
        where = hf_cache_dir(data_root, m.task) if m.task.source == "hf" else data_root / m.task.folder
        lines.append(f"  - {m.task.name} [{m.task.id}]: {m.path} {m.problem}")
        lines.append(f"      belongs at: {where}")
        lines.append(f"      download:   {m.fix}")
    if any(not m.task.id.startswith("synth_") for m in missing):
        lines.append(
            f"Or all of them at once, as DataComp's download_evalsets.py does: neuclip data fetch-eval {suite} "
            f"--root {shlex.quote(str(data_root))}"
        )
    return "\n".join(lines)


def nshards(task: Task, data_root: Path) -> int:
    return int((data_root / task.folder / "test" / "nshards.txt").read_text().strip())


def build_wds(task: Task, data_root: Path, transform, kind: str):
    """clip_benchmark's own `build_dataset` for a `wds/` folder (its classnames and templates come along)."""
    from clip_benchmark.datasets.builder import build_dataset

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*shardshuffle.*")
        return build_dataset(
            dataset_name=task.dataset,
            root=str(data_root / task.folder),
            transform=transform,
            split="test",
            download=False,
            task=kind,
        )


def _with_metadata(sample, transform):
    image, label, meta = sample
    meta = np.asarray(meta).reshape(-1)
    return transform(image), torch.as_tensor(np.concatenate([[int(label)], meta]), dtype=torch.long)


def wds_with_metadata(task: Task, data_root: Path, transform):
    """(image, [label, *metadata]) samples of a WILDS / fairness set: labels and the .npy metadata in one pass,
    so predictions and groups cannot come apart (DataComp reads the metadata in a second pass)."""
    import webdataset as wds

    root = data_root / task.folder
    pattern = str(root / "test" / f"{{0..{nshards(task, data_root) - 1}}}.tar")
    return (
        wds.WebDataset(pattern, shardshuffle=False, nodesplitter=lambda src: src)
        .decode(wds.autodecode.ImageHandler("pil", extensions=IMAGE_EXTENSIONS))
        .to_tuple(IMAGE_EXTENSIONS, "cls", "npy")
        .map(functools.partial(_with_metadata, transform=transform))
    )


def load_hf(task: Task, data_root: Path):
    """An `nlphuji/...` test split from the local `datasets` cache, offline (as DataComp loads it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    return datasets.load_dataset(task.dataset, split="test", cache_dir=str(data_root / "hf_cache"))


class HFRetrieval(torch.utils.data.Dataset):
    """(image tensor, [captions]) from an HF retrieval set with `image` and `caption` columns (DataComp)."""

    def __init__(self, hf, transform):
        self.hf, self.transform = hf, transform

    def __len__(self):
        return len(self.hf)

    def __getitem__(self, i):
        row = self.hf[i]
        return self.transform(row["image"]), list(row["caption"])


class HFWinoGAViL(torch.utils.data.Dataset):
    """(candidate images (n, 3, H, W), cue, true-association mask (n,)) per WinoGAViL instance (DataComp)."""

    def __init__(self, hf, transform):
        self.hf, self.transform = hf, transform

    def __len__(self):
        return len(self.hf)

    def __getitem__(self, i):
        ex = self.hf[i]
        images = torch.stack([self.transform(im) for im in ex["candidate_images"]])
        return images, ex["cue"], np.isin(ex["candidates"], ex["associations"])


def first(batch):
    return batch[0]
