"""Evaluate one saved model on one suite, through clip_benchmark's own code, resumably.

    summary = evaluate_suite("RUN/model", "tiny", data_root="data/synth", out_dir="RUN/eval/tiny")

Order of work: fingerprint the model, read finished task files in OUT_DIR, check the data of the tasks still to
do (fail before loading anything if any is missing), load the model once, evaluate each remaining task and
write OUT_DIR/<task>.json atomically as soon as it is done, then OUT_DIR/summary.json. A rerun skips every task
whose file is present, parses, holds its main metric, was computed from the same model weights and carries the
same task fingerprint: the sha256 of the task's definition (`task_definition`: data set, size, metric, ... and
the autocast plan it ran under). A task whose definition changed (a corrected task, another --precision) is
recomputed, with a line on stderr saying what changed.

Task file = clip_benchmark's output format ({dataset, model, pretrained, task, metrics, language}) plus a
"neuclip" block (task id, main metric, model fingerprint, task definition and fingerprint, device, precision,
timing). summary.json:
    {"suite", "model_dir", "tasks": {id: {"metric", "value", "json", "name"}},
     "groups": {"datacomp38", "imagenet_variants", "retrieval", "tiny": mean of main metrics or null}}
"json" is the task file's name relative to OUT_DIR. A group is null unless all its tasks are in the suite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuclip.atomic import write_json
from neuclip.eval import data as evdata
from neuclip.eval import metrics as evmetrics
from neuclip.eval.precision import DEFAULT as DEFAULT_PRECISION
from neuclip.eval.precision import autocast_plan
from neuclip.eval.suites import GROUPS, Task, suite_tasks
from neuclip.export import load_model

RECALL_K = [1, 5, 10]  # DataComp's retrieval recall@k list
DISPLAY_ONLY = ("name", "random_score")  # Task fields that do not change what is computed


class MissingDataError(RuntimeError):
    def __init__(self, message: str, missing: list[evdata.Missing]):
        super().__init__(message)
        self.missing = missing


class ForeignResultsError(RuntimeError):
    """OUT_DIR holds task results computed from other model weights."""


# ---------------------------------------------------------------------------------------------- files


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model folder's files (names and bytes): identifies the weights a result came from."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def task_definition(task: Task, amp: dict[str, bool]) -> dict:
    """Everything that fixes what a task's result is, besides the model: the Task's fields (display-only ones
    left out, so any field added to Task counts by default), the protocol constants the evaluator uses, and
    which encoder passes ran under autocast."""
    fields = {k: v for k, v in dataclasses.asdict(task).items() if k not in DISPLAY_ONLY}
    protocol = {"recall_k": RECALL_K} if task.kind == "retrieval" else {}
    return {"task": fields, "protocol": protocol, "amp": dict(amp)}


def definition_sha256(definition: dict) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def _changes(old, new, path="definition") -> list[str]:
    """'a.b: old -> new' for each leaf that differs between two definitions (paths below "definition")."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [f"{path.removeprefix('definition.')}: {json.dumps(old)} -> {json.dumps(new)}"]
    return [c for k in sorted(set(old) | set(new)) for c in _changes(old.get(k), new.get(k), f"{path}.{k}")]


def read_result(path: Path, task: Task, fingerprint: str, definition: dict) -> tuple[dict | None, str | None]:
    """(the finished result in `path`, None), or (None, why it cannot be reused; None when there is no file).
    Raises if the file belongs to another model."""
    if not path.is_file():
        return None, None
    try:
        result = json.loads(path.read_text())
        value = result["metrics"][task.main_metric]
        owner = result["neuclip"]["model_sha256"]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None, f"its main metric {task.main_metric} is {value!r}, not a number"
    except (ValueError, KeyError, TypeError) as err:  # torn or not ours: the new file replaces it atomically
        return None, f"unreadable or not a neuclip result ({type(err).__name__}: {err})"
    if owner != fingerprint:
        raise ForeignResultsError(
            f"{path} was computed from other model weights (sha256 {owner[:12]}..., this model {fingerprint[:12]}...):"
            " write to another --out folder, or pass --redo to recompute every task"
        )
    stored = result["neuclip"].get("task_sha256")
    if stored != definition_sha256(definition):
        old = result["neuclip"].get("task_definition")
        if stored is None or not isinstance(old, dict):
            return None, "it has no task fingerprint (written before results carried one)"
        return None, "its task definition changed: " + "; ".join(_changes(old, definition) or ["(fingerprint only)"])
    return result, None


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


def resolve_device(device: str | None) -> str:
    """The device string clip_benchmark can use. clip_benchmark passes `device` to torch.autocast, which takes
    a device *type*: `cuda:N` becomes the current CUDA device and "cuda"."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None:
            torch.cuda.set_device(dev.index)
    return dev.type


# ---------------------------------------------------------------------------------------------- tasks


def _wds_loader(dataset, task: Task, data_root: Path, batch_size: int, workers: int):
    # A worker with no shard makes webdataset fail: never start more workers than there are shards.
    workers = min(workers, evdata.nshards(task, data_root))
    return torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=workers)


def _zero_shot(model, tokenizer, classes, templates, loader, device, amp) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) from clip_benchmark's classifier and classification loop, each pass with its own
    autocast flag, as DataComp's wds_eval.py calls them (classifier at amp=True, images at amp=False)."""
    from clip_benchmark.metrics import zeroshot_classification as zsc

    classifier = zsc.zero_shot_classifier(model, tokenizer, classes, templates, device, amp=amp["text"])
    if not amp["image"]:
        classifier = classifier.float()  # fp32 image features need an fp32 classifier for the matmul
    return zsc.run_classification(model, classifier, loader, device, amp=amp["image"])


def _accuracies(logits, labels, num_classes) -> dict:
    """clip_benchmark's zeroshot_classification.evaluate metrics (acc5 NaN below 5 classes)."""
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from sklearn.metrics import balanced_accuracy_score

    if num_classes >= 5:
        acc1, acc5 = zsc.accuracy(logits, labels, topk=(1, 5))
    else:
        (acc1,), acc5 = zsc.accuracy(logits, labels, topk=(1,)), float("nan")
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": balanced_accuracy_score(labels, logits.argmax(1))}


def _classification(task, model, transform, tokenizer, data_root, bs, workers, device, amp) -> dict:
    ds = evdata.build_wds(task, data_root, transform, "zeroshot_classification")
    loader = _wds_loader(ds, task, data_root, bs, workers)
    logits, labels = _zero_shot(model, tokenizer, ds.classes, ds.templates, loader, device, amp)
    return _accuracies(logits, labels, len(ds.classes))


def _wilds(task, model, transform, tokenizer, data_root, bs, workers, device, amp) -> dict:
    """The classification metrics plus the task's WILDS / fairness group metrics."""
    meta = evdata.build_wds(task, data_root, None, "zeroshot_classification")  # classnames + templates
    loader = _wds_loader(evdata.wds_with_metadata(task, data_root, transform), task, data_root, bs, workers)
    logits, target = _zero_shot(model, tokenizer, meta.classes, meta.templates, loader, device, amp)
    labels, metadata = target[:, 0], target[:, 1:]
    out = _accuracies(logits, labels, len(meta.classes))
    out.update(evmetrics.wilds_metrics(task.wilds, logits.numpy(), labels.numpy(), metadata.numpy()))
    return out


def _one_flag(task: Task, amp: dict[str, bool]) -> None:
    if amp["text"] != amp["image"]:
        raise ValueError(f"{task.id}: {task.kind} runs both encoders at one precision, got autocast {amp}")


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
    _one_flag(task, amp)  # zsr.evaluate has one flag for both encoders
    out = zsr.evaluate(model, loader, tokenizer, device=device, amp=amp["image"], recall_k_list=RECALL_K)
    out["mean_recall@1"] = 0.5 * (out["text_retrieval_recall@1"] + out["image_retrieval_recall@1"])  # DataComp
    return out


def _winogavil(task, model, transform, tokenizer, data_root, bs, workers, device, amp) -> dict:
    """DataComp's wino_eval.py: per instance, the cue prompt's k most similar candidates against the k true."""
    from tqdm import tqdm

    _one_flag(task, amp)  # both encoders and the similarities in one autocast block, as wino_eval.py
    ds = evdata.HFWinoGAViL(evdata.load_hf(task, data_root), transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=evdata.first)
    scores, sizes = [], []
    for images, cue, y_true in tqdm(loader, desc=task.id):
        with torch.no_grad(), torch.autocast(device, enabled=amp["image"]):
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
    precision: str = DEFAULT_PRECISION,
    redo: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate `model_dir` (a `save_model` folder) on `suite`; write task files and summary.json; return it.
    `precision`: one of neuclip.eval.precision.PRECISIONS (which passes run under autocast)."""
    from tqdm import tqdm

    model_dir, data_root, out_dir = Path(model_dir).resolve(), Path(data_root).resolve(), Path(out_dir)
    tasks = suite_tasks(suite)
    if not (model_dir / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model (no open_clip_config.json); expected RUN/model")
    if batch_size < 1 or workers < 0:
        raise ValueError("need --batch-size >= 1 and --workers >= 0")
    fingerprint = model_fingerprint(model_dir)
    device_type = resolve_device(device)
    amp = {t.id: autocast_plan(precision, device_type, t.kind) for t in tasks}
    definitions = {t.id: task_definition(t, amp[t.id]) for t in tasks}

    results = {}
    if not redo:
        for t in tasks:
            found, why = read_result(out_dir / f"{t.id}.json", t, fingerprint, definitions[t.id])
            if found is not None:
                results[t.id] = found
            elif why is not None:
                print(f"neuclip eval: recomputing {t.id} ({out_dir / t.id}.json): {why}", file=sys.stderr, flush=True)
    todo = [t for t in tasks if t.id not in results]
    missing = [m for m in (evdata.check_task(t, data_root) for t in todo) if m is not None]
    if missing:
        raise MissingDataError(evdata.format_missing(suite, data_root, missing, len(tasks)), missing)

    if todo:
        model, transform, tokenizer = load_model(model_dir, device=device_type)
        bar = tqdm(todo, desc=f"{suite}", unit="task", disable=not progress)
        for t in bar:
            bar.set_postfix_str(t.id)
            start = time.perf_counter()
            with warnings.catch_warnings():
                # clip_benchmark's accuracy() takes float() of a 1-element array: harmless while numpy < 2.4
                warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)
                evaluate = EVALUATORS[t.kind]
                metrics = evaluate(
                    t, model, transform, tokenizer, data_root, batch_size, workers, device_type, amp[t.id]
                )
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
                    "task_sha256": definition_sha256(definitions[t.id]),
                    "task_definition": definitions[t.id],
                    "data": str(data_root / t.folder),
                    "device": device_type,
                    "precision": precision,
                    "amp": amp[t.id],
                    "batch_size": batch_size,
                    "seconds": round(time.perf_counter() - start, 3),
                },
            }
            write_json(out_dir / f"{t.id}.json", result)
            results[t.id] = result
            value = metrics[t.main_metric]
            if progress:
                shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
                bar.write(f"{t.name} [{t.id}]: {t.main_metric} = {shown}")
    summary = summarize(suite, model_dir, tasks, results)
    write_json(out_dir / "summary.json", summary)
    return summary
