"""A training run's own normaliser error: its embeddings of its training data, exact alpha* and its estimate.

Two callers share `measure`:
- `neuclip error run RUN_DIR` (`score_run`): the run's newest checkpoint, written to RUN/error/error.{json,csv};
- the trainer's `error.every` hook (neuclip/error_study/tracking.py): every K steps during training.

The data is embedded with the model's *evaluation* transform (deterministic; training saw augmented views, a
small difference), sorted by sample id so that the result does not depend on the number of reader processes.
The exact alpha* at the estimator's current temperature is computed for a fixed random anchor subset against
every embedded sample, and the method's own estimate is scored (docs/method.md §6.3).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from neuclip.atomic import write_atomic, write_json
from neuclip.error_study.estimates import SCORED_KINDS, score
from neuclip.error_study.exact import exact_log_normalizers


class ShardImages(IterableDataset):
    """(image tensor, caption, sample id) of every sample of `shards`; worker w reads shards w, w+W, ...

    With `skip_bad` (the run's data.skip_bad) an unreadable shard or sample is skipped, as training skipped
    it; otherwise it is an error naming the shard and key.
    """

    def __init__(self, shards: list[str], transform, skip_bad: bool = False):
        self.shards, self.transform, self.skip_bad = shards, transform, skip_bad

    def __iter__(self):
        # The shared reader and bad-sample rule (neuclip/data/check.py): the samples training used, by offset.
        from neuclip.data.check import BadImage, open_image
        from neuclip.data.shards import IMAGE_EXTS, MemberReader, ShardError, shard_index

        info = get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        reader = MemberReader()
        for shard in mine:
            try:
                index = shard_index(shard)
                for i in range(len(index)):
                    try:
                        if index.problems.get(i):
                            raise BadImage("; ".join(reason for _, reason in index.problems[i]))
                        ext = IMAGE_EXTS[index.image_ext[i]]
                        image = open_image(reader.read(shard, *map(int, index.image[i])), ext)
                        text = reader.read(shard, *map(int, index.text[i])).decode("utf-8")
                    except BadImage as err:
                        if self.skip_bad:
                            continue
                        raise ValueError(
                            f"{shard}: sample {index.key(i)}: {err}; fix the data or set data.skip_bad=true"
                        ) from None
                    yield self.transform(image), text, int(index.ids[i])
            except ShardError as err:
                if not self.skip_bad:
                    raise ValueError(f"{shard}: {err}; fix the data or set data.skip_bad=true") from err
        reader.close()


def _collate(items):
    images, texts, ids = zip(*items)
    return torch.stack(images), list(texts), torch.tensor(ids)


@torch.no_grad()
def embed_shards(
    model,
    transform,
    tokenizer,
    shards: list[str],
    batch: int,
    device,
    workers: int = 0,
    skip_bad: bool = False,
    bf16: bool = False,
    allow_empty: bool = False,
):
    """(image, text, ids): float32 embeddings on `device` in reading order (None when the shards hold no
    sample and `allow_empty`, e.g. a rank given no shard). Pass them through `sort_by_id` before use: that is
    done once, after any gathering across ranks."""
    loader = DataLoader(
        ShardImages(shards, transform, skip_bad),
        batch_size=batch,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    out: tuple[list, list, list] = ([], [], [])
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        for images, texts, ids in loader:
            out[0].append(model.encode_image(images.to(device), normalize=True).float())
            out[1].append(model.encode_text(tokenizer(texts).to(device), normalize=True).float())
            out[2].append(ids.to(device))
    if not out[0]:
        if allow_empty:
            return None
        raise ValueError(f"no samples could be read from {len(shards)} shard(s), e.g. {shards[:1]}")
    return tuple(torch.cat(parts) for parts in out)


def sort_by_id(image, text, ids):
    """Rows ordered by sample id (so nothing depends on reader or rank order), re-normalised: bf16 encoders
    return unit vectors only to bf16 precision. Duplicate ids are an error."""
    order = torch.argsort(ids)
    if bool((ids[order][1:] == ids[order][:-1]).any()):
        raise ValueError("duplicate sample ids in the training shards: run `neuclip data check` on them")
    return (
        torch.nn.functional.normalize(image[order], dim=1),
        torch.nn.functional.normalize(text[order], dim=1),
        ids[order],
    )


def anchor_positions(n: int, anchors: int, seed: int) -> torch.Tensor:
    """A fixed random subset of row positions (rows are sorted by id, so the subset is a fixed set of ids)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[: min(anchors, n)]


@torch.no_grad()
def measure(estimator, image, text, ids, anchors: torch.Tensor, batch_size: int, seed: int) -> dict:
    """The estimator's error against the exact alpha* of `anchors` (positions) over all n embedded rows."""
    tau, eps = float(estimator.temperature()), estimator.cfg.get("eps", 1e-14)
    anchors = anchors.to(image.device)
    exact = exact_log_normalizers(image, text, tau, eps, anchors=anchors, accumulate="float64")
    gen = torch.Generator().manual_seed(seed)  # the mini-batch estimator's random partition (CPU generator)
    row = score(estimator, image, text, ids, anchors, tau, eps, batch_size, gen, exact)
    return {
        "n": int(image.shape[0]),
        "batch_size": batch_size,
        "n_over_b": image.shape[0] / batch_size,
        "tau": tau,
        "anchors": int(anchors.numel()),
        "alpha_star_mean": float(torch.cat(exact).mean()),
        **(row or {}),
    }


def score_run(run_dir, anchors: int = 2048, shards: int | None = None, batch: int = 256, seed: int = 0):
    """Score the run's newest checkpoint over its training data (only the first `shards` shards if given)."""
    from neuclip.data.shards import expand_pattern
    from neuclip.estimators import EstimatorContext
    from neuclip.estimators.registry import build_estimator
    from neuclip.export import create_model
    from neuclip.train import checkpoint as ckpt
    from neuclip.train.config import yaml_load

    run_dir = Path(run_dir)
    cfg = yaml_load((run_dir / "config.yaml").read_text())
    found = ckpt.load_latest(run_dir / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint: train the run first")
    path, state = found
    model, _, eval_tf, tokenizer = create_model(cfg["model"])
    model.load_state_dict(state["model"])
    model.eval()
    method = cfg["method"]
    probe = model.encode_text(tokenizer(["x"]), normalize=True)
    ctx = EstimatorContext(embed_dim=probe.shape[1], data_size=cfg["data"]["data_size"])
    est = build_estimator(method["name"], method["options"], ctx, common=method.get("common_options"))
    est.load_state_dict(state["estimator"])
    if est.estimate_kind not in SCORED_KINDS:
        raise ValueError(f"{method['name']} has no normaliser estimate to score (estimate_kind={est.estimate_kind})")
    t0 = time.perf_counter()
    files = [str(p) for p in expand_pattern(cfg["data"]["train_shards"])][:shards]
    image, text, ids = sort_by_id(
        *embed_shards(model, eval_tf, tokenizer, files, batch, "cpu", skip_bad=cfg["data"]["skip_bad"])
    )
    row = measure(
        est, image, text, ids, anchor_positions(image.shape[0], anchors, seed), cfg["train"]["global_batch_size"], seed
    )
    row = {
        "run": str(run_dir),
        "method": method["name"],
        "checkpoint": path.name,
        "step": int(state["step"]),
        **row,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    out = run_dir / "error"
    # atomically, error.json (what Snakemake tracks) last: once it exists, the csv beside it is complete
    write_atomic(out / "error.csv", ",".join(row) + "\n" + ",".join(str(v) for v in row.values()) + "\n")
    write_json(out / "error.json", row, indent=2)
    return row
