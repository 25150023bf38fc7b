"""Evaluate one saved model on one suite, through clip_benchmark's own code, resumably.

    summary = evaluate_suite("RUN/model", "tiny", data_root="data/synth", out_dir="RUN/eval/tiny")

Order of work: fingerprint the model, read finished task files in OUT_DIR, check the data of the tasks still to
do (fail before loading anything if any is missing), load the model once, evaluate each remaining task and
write OUT_DIR/<task>.json atomically as soon as it is done, then OUT_DIR/summary.json. A rerun skips every task
whose file is present, parses, holds its main metric and was computed from the same model weights.

Task file = clip_benchmark's output format ({dataset, model, pretrained, task, metrics, language}) plus a
"neuclip" block (task id, main metric, model fingerprint, device, amp, timing). summary.json:
    {"suite", "model_dir", "tasks": {id: {"metric", "value", "json", "name"}},
     "groups": {"datacomp38", "imagenet_variants", "retrieval", "tiny": mean of main metrics or null}}
"json" is the task file's name relative to OUT_DIR. A group is null unless all its tasks are in the suite.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuclip.eval import data as evdata
from neuclip.eval import metrics as evmetrics
from neuclip.eval.suites import GROUPS, Task, suite_tasks

RECALL_K = [1, 5, 10]  # DataComp's retrieval recall@k list


class MissingDataError(RuntimeError):
    def __init__(self, message: str, missing: list[evdata.Missing]):
        super().__init__(message)
        self.missing = missing


class ForeignResultsError(RuntimeError):
    """OUT_DIR holds task results computed from other model weights."""


# ---------------------------------------------------------------------------------------------- files


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model folder's files (names and bytes): identifies the weights a result came from."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_result(path: Path, task: Task, fingerprint: str) -> dict | None:
    """The finished result in `path`, or None if absent or unusable; raises if it belongs to another model."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        value = result["metrics"][task.main_metric]
        owner = result["neuclip"]["model_sha256"]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
    except (ValueError, KeyError, TypeError):
        return None  # unreadable or not ours: recompute (the new file replaces it atomically)
    if owner != fingerprint:
        raise ForeignResultsError(
            f"{path} was computed from other model weights (sha256 {owner[:12]}..., this model {fingerprint[:12]}...):"
            " write to another --out folder, or pass --redo to recompute every task"
        )
    return result


def summarize(suite: str, model_dir: Path, tasks: list[Task], results: dict[str, dict]) -> dict:
    entries = {}
    for t in tasks:
        value = results[t.id]["metrics"][t.main_metric]
        entries[t.id] = {"metric": t.main_metric, "value": float(value), "json": f"{t.id}.json", "name": t.name}
    groups = {}
    for group, ids in GROUPS.items():
        groups[group] = float(np.mean([entries[i]["value"] for i in ids])) if all(i in entries for i in ids) else None
    return {"suite": suite, "model_dir": str(model_dir), "tasks": entries, "groups": groups}


# ---------------------------------------------------------------------------------------------- devices


def resolve_device(device: str | None, amp: bool | None) -> tuple[str, bool]:
    """(device string clip_benchmark can use, amp). clip_benchmark passes `device` to torch.autocast, which
    takes a device *type*: `cuda:N` becomes the current CUDA device and "cuda". amp defaults to on for GPUs
    only (on CPU autocast means bf16, which changes results)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None:
            torch.cuda.set_device(dev.index)
    return dev.type, (dev.type == "cuda") if amp is None else bool(amp)


# ---------------------------------------------------------------------------------------------- tasks


def _wds_loader(dataset, task: Task, data_root: Path, batch_size: int, workers: int):
    # A worker with no shard makes webdataset fail: never start more workers than there are shards.
    workers = min(workers, evdata.nshards(task, data_root))
    return torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=workers)


def _classification(task, model, transform, tokenizer, data_root, bs, workers, device, amp) -> dict:
    from clip_benchmark.metrics import zeroshot_classification as zsc

    ds = evdata.build_wds(task, data_root, transform, "zeroshot_classification")
    loader = _wds_loader(ds, task, data_root, bs, workers)
    return zsc.evaluate(model, loader, tokenizer, ds.classes, ds.templates, device=device, amp=amp, verbose=False)


def _wilds(task, model, transform, tokenizer, data_root, bs, workers, device, amp) -> dict:
    """clip_benchmark's classifier and classification loop (as DataComp's wds_eval.py), its metrics as in
    zeroshot_classification.evaluate, plus the task's WILDS / fairness group metrics."""
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from sklearn.metrics import balanced_accuracy_score

    meta = evdata.build_wds(task, data_root, None, "zeroshot_classification")  # classnames + templates
    loader = _wds_loader(evdata.wds_with_metadata(task, data_root, transform), task, data_root, bs, workers)
    classifier = zsc.zero_shot_classifier(model, tokenizer, meta.classes, meta.templates, device, amp=amp)
    logits, target = zsc.run_classification(model, classifier, loader, device, amp=amp)
    labels, metadata = target[:, 0], target[:, 1:]
    if len(meta.classes) >= 5:
        acc1, acc5 = zsc.accuracy(logits, labels, topk=(1, 5))
    else:
        (acc1,), acc5 = zsc.accuracy(logits, labels, topk=(1,)), float("nan")
    out = {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": balanced_accuracy_score(labels, logits.argmax(1))}
    out.update(evmetrics.wilds_metrics(task.wilds, logits.numpy(), labels.numpy(), metadata.numpy()))
    return out


def _retrieval(task, model, transform, tokenizer, data_root, bs, workers, device, amp) -> dict:
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval as zsr

    if task.source == "hf":
        ds = evdata.HFRetrieval(evdata.load_hf(task, data_root), transform)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=bs, shuffle=False, num_workers=workers, collate_fn=image_captions_collate_fn
        )
    else:
        loader = _wds_loader(
            evdata.build_wds(task, data_root, transform, "zeroshot_retrieval"), task, data_root, bs, workers
        )
    out = zsr.evaluate(model, loader, tokenizer, device=device, amp=amp, recall_k_list=RECALL_K)
    out["mean_recall@1"] = 0.5 * (out["text_retrieval_recall@1"] + out["image_retrieval_recall@1"])  # DataComp
    return out


def _winogavil(task, model, transform, tokenizer, data_root, bs, workers, device, amp) -> dict:
    """DataComp's wino_eval.py: per instance, the cue prompt's k most similar candidates against the k true."""
    from tqdm import tqdm

    ds = evdata.HFWinoGAViL(evdata.load_hf(task, data_root), transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=evdata.first)
    scores, sizes = [], []
    for images, cue, y_true in tqdm(loader, desc=task.id):
        with torch.no_grad(), torch.autocast(device, enabled=amp):
            image_features = F.normalize(model.encode_image(images.to(device)), dim=-1)
            text_features = F.normalize(
                model.encode_text(tokenizer([evmetrics.winogavil_prompt(cue)]).to(device)), dim=-1
            )
            similarities = (text_features @ image_features.T).squeeze(0).float().cpu().numpy()
        scores.append(evmetrics.winogavil_instance_score(similarities, y_true))
        sizes.append(len(images))
    return evmetrics.winogavil_metrics(scores, sizes)


EVALUATORS = {"classification": _classification, "wilds": _wilds, "retrieval": _retrieval, "winogavil": _winogavil}


# ---------------------------------------------------------------------------------------------- suite


def evaluate_suite(
    model_dir,
    suite: str,
    data_root,
    out_dir,
    *,
    batch_size: int = 64,
    workers: int = 4,
    device: str | None = None,
    amp: bool | None = None,
    redo: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate `model_dir` (a `save_model` folder) on `suite`; write task files and summary.json; return it."""
    from tqdm import tqdm

    model_dir, data_root, out_dir = Path(model_dir).resolve(), Path(data_root).resolve(), Path(out_dir)
    tasks = suite_tasks(suite)
    if not (model_dir / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model (no open_clip_config.json); expected RUN/model")
    if batch_size < 1 or workers < 0:
        raise ValueError("need --batch-size >= 1 and --workers >= 0")
    fingerprint = model_fingerprint(model_dir)

    results = {}
    if not redo:
        for t in tasks:
            found = read_result(out_dir / f"{t.id}.json", t, fingerprint)
            if found is not None:
                results[t.id] = found
    todo = [t for t in tasks if t.id not in results]
    missing = [m for m in (evdata.check_task(t, data_root) for t in todo) if m is not None]
    if missing:
        raise MissingDataError(evdata.format_missing(suite, data_root, missing, len(tasks)), missing)

    if todo:
        from neuclip.export import load_model

        device_type, amp = resolve_device(device, amp)
        model, transform, tokenizer = load_model(model_dir, device=device_type)
        bar = tqdm(todo, desc=f"{suite}", unit="task", disable=not progress)
        for t in bar:
            bar.set_postfix_str(t.id)
            start = time.perf_counter()
            with warnings.catch_warnings():
                # clip_benchmark's accuracy() takes float() of a 1-element array: harmless while numpy < 2.4
                warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)
                evaluate = EVALUATORS[t.kind]
                metrics = evaluate(t, model, transform, tokenizer, data_root, batch_size, workers, device_type, amp)
            metrics = {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in metrics.items()}
            result = {
                "dataset": t.dataset,
                "model": f"local-dir:{model_dir}",
                "pretrained": str(model_dir),
                "task": t.clip_benchmark_task,
                "metrics": metrics,
                "language": "en",
                "neuclip": {
                    "task": t.id,
                    "name": t.name,
                    "main_metric": t.main_metric,
                    "model_sha256": fingerprint,
                    "data": str(data_root / t.folder),
                    "device": device_type,
                    "amp": amp,
                    "batch_size": batch_size,
                    "seconds": round(time.perf_counter() - start, 3),
                },
            }
            write_json_atomic(out_dir / f"{t.id}.json", result)
            results[t.id] = result
            value = metrics[t.main_metric]
            if progress:
                shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
                bar.write(f"{t.name} [{t.id}]: {t.main_metric} = {shown}")
    summary = summarize(suite, model_dir, tasks, results)
    write_json_atomic(out_dir / "summary.json", summary)
    return summary
