"""A training run's own normaliser error: its embeddings of its training data, exact alpha* and its estimate.

Two callers share `measure_streaming`:
- `neuclip error run RUN_DIR` (`score_run`): the run's newest checkpoint, written to RUN/error/error.{json,csv}
  (one process, or every rank of a job when started with torch.distributed's environment: DISTRIBUTED);
- the trainer's `error.every` hook (neuclip/error_study/tracking.py): every K steps during training.

The data is embedded with the model's *evaluation* transform (deterministic; training saw augmented views, a
small difference). Rows are identified by their position in the samples ordered by id, so nothing depends on
the number of ranks or reader processes. The exact alpha* at the estimator's current temperature is computed
for a fixed random anchor subset against every sample, and the method's own estimate is scored (docs/method.md
§6.3). The pass is distributed and streaming (docs/method.md §6.2): each rank reads its share of the shards'
index (the sample ids, no decoding), the anchors are embedded by the ranks holding them and all-reduced to
every rank, then each rank streams its own samples through the model once, keeping per-anchor running
log-sums (neuclip/error_study/exact.py `StreamingExact`), which are combined across ranks at the end. Memory
per rank: anchors x d plus one embedding batch and its anchors x chunk logits, and 8 bytes per sample id (the
ids, and for the mini-batch estimate its partition), never n x d. `measure` is the one-process pass over
embeddings held in memory, which the streaming pass equals (tests/test_error_streaming.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from neuclip.atomic import write_atomic, write_json
from neuclip.data.check import BadImage, open_image
from neuclip.data.index import shard_index
from neuclip.data.shards import IMAGE_EXTS, MemberReader, ShardError, expand_pattern
from neuclip.error_study.estimates import SCORED_KINDS, score, score_estimates
from neuclip.error_study.exact import StreamingExact, exact_log_normalizers
from neuclip.estimators import EstimatorContext
from neuclip.estimators.registry import build_estimator
from neuclip.export import create_model
from neuclip.train import checkpoint as ckpt
from neuclip.train.resume import estimator_state
from neuclip.train.runtime import setup_distributed
from neuclip.yamlio import yaml_load

DISTRIBUTED = True  # every rank of a job runs the pass (neuclip/jobs/launch.py run_error)


class ShardImages(IterableDataset):
    """(image tensor, caption, sample id) of every sample of `shards`; worker w reads shards w, w+W, ...

    With `skip_bad` (the run's data.skip_bad) an unreadable shard or sample is skipped, as training skipped
    it; otherwise it is an error naming the shard and key. `select` ({shard: entry numbers}) reads only those
    entries of those shards; with `report_bad` a skipped sample yields (None, None, id) instead of nothing.
    """

    def __init__(self, shards: list[str], transform, skip_bad: bool = False, select: dict | None = None,
                 report_bad: bool = False):
        self.shards, self.transform, self.skip_bad = shards, transform, skip_bad
        self.select, self.report_bad = select, report_bad
        if select is not None:
            self.shards = [shard for shard in shards if shard in select]

    def __iter__(self):
        # The shared reader and bad-sample rule (neuclip/data/check.py): the samples training used, by offset.

        info = get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        reader = MemberReader()
        for shard in mine:
            try:
                index = shard_index(shard)
                for i in range(len(index)) if self.select is None else self.select[shard]:
                    try:
                        if index.problems.get(i):
                            raise BadImage("; ".join(reason for _, reason in index.problems[i]))
                        ext = IMAGE_EXTS[index.image_ext[i]]
                        image = open_image(reader.read(shard, *map(int, index.image[i])), ext)
                        text = reader.read(shard, *map(int, index.text[i])).decode("utf-8")
                    except BadImage as err:
                        if self.skip_bad:
                            if self.report_bad:
                                yield None, None, int(index.ids[i])
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


def _usable(shards: list[str], skip_bad: bool):
    """(ids, shard numbers, entry numbers) of the samples `ShardImages` would read from `shards` (the cached
    index: no decoding; images that turn out not to decode are found while embedding)."""
    import numpy as np


    ids, where, entries = [], [], []
    for k, shard in enumerate(shards):
        try:
            index = shard_index(shard)
        except ShardError as err:
            if not skip_bad:
                raise ValueError(f"{shard}: {err}; fix the data or set data.skip_bad=true") from err
            continue
        good = np.array([i for i in range(len(index)) if not index.problems.get(i)], dtype=np.int64)
        ids.append(np.asarray(index.ids, dtype=np.int64)[good])
        where.append(np.full(good.size, k, dtype=np.int64))
        entries.append(good)
    cat = (lambda xs: torch.from_numpy(np.concatenate(xs))) if ids else (lambda xs: torch.zeros(0, dtype=torch.long))
    return cat(ids), cat(where), cat(entries)


def _all_gather_cat(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's 1-d `x` (lengths may differ, some may be empty), concatenated in rank order."""
    if world == 1:
        return x
    import torch.distributed as dist

    count = torch.tensor([x.numel()], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = max(int(c) for c in counts)
    padded = x.new_zeros(most)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts)])


def _all_reduce(*tensors, world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)


@torch.no_grad()
def _embedded(model, transform, tokenizer, shards, batch, device, workers, skip_bad, bf16, select=None):
    """(image, text, ids, bad ids) per batch of `shards` (rows unit-normalised in float32, as `sort_by_id`)."""
    loader = DataLoader(
        ShardImages(shards, transform, skip_bad, select=select, report_bad=True),
        batch_size=batch,
        num_workers=workers if shards else 0,
        collate_fn=lambda items: items,
        persistent_workers=False,
    )
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        for items in loader:
            good = [it for it in items if it[0] is not None]
            bad = torch.tensor([it[2] for it in items if it[0] is None], dtype=torch.long)
            if not good:
                yield None, None, torch.zeros(0, dtype=torch.long, device=device), bad
                continue
            images, texts, ids = _collate(good)
            image = model.encode_image(images.to(device), normalize=True).float()
            text = model.encode_text(tokenizer(texts).to(device), normalize=True).float()
            norm = torch.nn.functional.normalize
            yield norm(image, dim=1), norm(text, dim=1), ids.to(device), bad


def _partition(n: int, batch_size: int, seed: int, device) -> torch.Tensor:
    """Each position's batch in the mini-batch estimate's random partition (-1: in no full batch), drawn exactly
    as `measure` draws it (estimates.minibatch_log_normalizers_of: randperm(n) from a CPU generator seeded by
    `seed`, consecutive slots of batch_size)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    slot = torch.empty(n, dtype=torch.long, device=device)
    slot[perm] = torch.arange(n, device=device)
    return torch.where(slot < (n // batch_size) * batch_size, slot // batch_size, -1)


@torch.no_grad()
def measure_streaming(estimator, model, transform, tokenizer, shards: list[str], *, anchors: int,
                      train_batch: int, seed: int, embed_batch: int, device, embed_dim: int, workers: int = 0,
                      skip_bad: bool = False, bf16: bool = False, rank: int = 0, world: int = 1) -> dict:
    """`measure` over the samples of `shards`, streamed (see the module docstring). A collective when
    world > 1: every rank calls it with the same arguments and gets the same row."""
    device = torch.device(device)
    tau, eps = float(estimator.temperature()), estimator.cfg.get("eps", 1e-14)
    mine = shards[rank::world]
    ids, where, entries = (t.to(device) for t in _usable(mine, skip_bad))
    dropped = torch.zeros(0, dtype=torch.long, device=device)
    while True:  # once, or again without the images found undecodable (skip_bad): the row set decides n
        keep = ~torch.isin(ids, dropped)
        everyone = torch.sort(_all_gather_cat(ids[keep], world)).values
        if bool((everyone[1:] == everyone[:-1]).any()):
            raise ValueError("duplicate sample ids in the training shards: run `neuclip data check` on them")
        n = everyone.numel()
        if n < 2:
            raise ValueError(f"error measurement: {n} readable sample(s) in {len(shards)} shard(s), need 2")
        rows = anchor_positions(n, anchors, seed).to(device)
        anchor_ids = everyone[rows]
        by_id = torch.argsort(anchor_ids)
        a_image = torch.zeros(rows.numel(), embed_dim, device=device)
        a_text = torch.zeros_like(a_image)
        found = torch.zeros(rows.numel(), device=device)
        held = keep & torch.isin(ids, anchor_ids)  # the anchors among this rank's samples
        select: dict = {}
        for k, e in zip(where[held].tolist(), entries[held].tolist()):
            select.setdefault(mine[k], []).append(e)
        bad = [torch.zeros(0, dtype=torch.long)]  # ids of images that did not decode (skip_bad)
        for image, text, got, failed in _embedded(model, transform, tokenizer, mine, embed_batch, device, workers,
                                                   skip_bad, bf16, select=select):
            bad.append(failed)
            if image is not None:
                at = by_id[torch.searchsorted(anchor_ids[by_id], got)]
                a_image[at], a_text[at], found[at] = image, text, 1.0
        _all_reduce(a_image, a_text, found, world=world)  # one holder per anchor: a broadcast by sum
        minibatch = estimator.estimate_kind == "minibatch"
        stream = StreamingExact(a_image, a_text, rows, n, tau, eps, batch_size=train_batch,
                                batch_of=_partition(n, train_batch, seed, device) if minibatch else None)
        for image, text, got, failed in _embedded(model, transform, tokenizer, mine, embed_batch, device, workers,
                                                   skip_bad, bf16):
            bad.append(failed)
            if image is not None:
                stream.add(image, text, torch.searchsorted(everyone, got))
        failed = torch.unique(_all_gather_cat(torch.unique(torch.cat(bad)).to(device), world))
        new = failed[~torch.isin(failed, dropped)]  # what was left out is still read (and fails) again
        if new.numel() == 0:
            break
        dropped = torch.unique(torch.cat([dropped, new]))
    if int(found.sum()) != rows.numel():
        raise ValueError(f"error measurement: {rows.numel() - int(found.sum())} anchor(s) were not embedded")
    out = stream.result()
    exact, est = out if minibatch else (out, None)
    if estimator.estimate_kind == "state":
        est = estimator.log_normalizers(a_image, a_text, anchor_ids)  # collective for sharded state
    return {
        "n": n,
        "batch_size": train_batch,
        "n_over_b": n / train_batch,
        "tau": tau,
        "anchors": int(rows.numel()),
        "alpha_star_mean": float(torch.cat(exact).mean()),
        **(score_estimates(est, exact) if est is not None else {}),
    }


def score_run(run_dir, anchors: int = 2048, shards: int | None = None, batch: int = 256, seed: int = 0,
              device: str = "auto"):
    """Score the run's newest checkpoint over its training data (only the first `shards` shards if given).

    Under torch.distributed's environment (torchrun, or a job of several tasks: neuclip/jobs/launch.py) every rank
    runs it on its own GPU (`device` auto: cuda if there is one) with its share of the data and, for sharded
    per-sample state, its own shard of the checkpoint (re-cut if the training ran on another world size);
    rank 0 writes RUN/error/error.{json,csv}."""
    import torch.distributed as dist


    want = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    joined = not (dist.is_available() and dist.is_initialized())  # leave a caller's process group alone
    rank, world, local_rank = setup_distributed(want, timeout_min=120)
    dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if want == "cuda" else torch.device("cpu")
    try:
        run_dir = Path(run_dir)
        cfg = yaml_load((run_dir / "config.yaml").read_text())
        model, _, eval_tf, tokenizer = create_model(cfg["model"], device=dev)
        method = cfg["method"]
        probe = model.encode_text(tokenizer(["x"]).to(dev), normalize=True)
        ctx = EstimatorContext(embed_dim=probe.shape[1], data_size=cfg["data"]["data_size"])
        est = build_estimator(method["name"], method["options"], ctx, common=method.get("common_options")).to(dev)
        if est.estimate_kind not in SCORED_KINDS:
            raise ValueError(f"{method['name']} has no normaliser estimate to score "
                             f"(estimate_kind={est.estimate_kind})")

        def complete(path: Path, state: dict) -> dict:
            return {**state, "estimator": estimator_state(path, state, est)}

        agree = None
        if world > 1:
            def agree(ok: bool) -> bool:
                flag = torch.tensor(int(ok), device=dev)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                return bool(flag)
        found = ckpt.load_latest(run_dir / "checkpoints", complete=complete, agree=agree)
        if found is None:
            raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint: train the run first")
        path, state = found
        model.load_state_dict(state["model"])
        model.eval()
        est.load_state_dict(state["estimator"])
        t0 = time.perf_counter()
        files = [str(p) for p in expand_pattern(cfg["data"]["train_shards"])][:shards]
        row = measure_streaming(
            est, model, eval_tf, tokenizer, files, anchors=anchors, train_batch=cfg["train"]["global_batch_size"],
            seed=seed, embed_batch=batch, device=dev, embed_dim=probe.shape[1], skip_bad=cfg["data"]["skip_bad"],
            rank=rank, world=world,
        )
        row = {
            "run": str(run_dir),
            "method": method["name"],
            "checkpoint": path.name,
            "step": int(state["step"]),
            **row,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if rank == 0:
            out = run_dir / "error"
            # atomically, error.json (what Snakemake tracks) last: once it exists, the csv beside it is complete
            write_atomic(out / "error.csv", ",".join(row) + "\n" + ",".join(str(v) for v in row.values()) + "\n")
            write_json(out / "error.json", row, indent=2)
        return row
    finally:
        if joined and world > 1 and dist.is_initialized():
            dist.destroy_process_group()
