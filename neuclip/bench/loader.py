"""`neuclip bench loader`: the training loader's samples/s per core against open_clip's own webdataset
pipeline on the same shards, what each stage of a sample costs, and the time to the first batch after a resume
at the start of an epoch against deep into it.

Everything runs in this process on one thread with no loader workers, and throughput and stage costs are
timed in this process's CPU time, so samples/s is per core even when other jobs share the machine (the
resume latencies are wall-clock). Both loaders
get open_clip's ViT-B-32 train transform (RandomResizedCrop 224, scale (0.9, 1), bicubic) and tokenizer.
open_clip's pipeline is `open_clip_train.data.get_wds_dataset`, with one change for the benchmark only: its tar
expander is called with `eof_value=None`, without which webdataset 1.0.2 raises KeyError 'fname' at the end of
each shard (webdataset issue #384).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from neuclip.bench.common import command_line, machine_line, publish
from neuclip.data.check import _Seen, open_image, survey
from neuclip.data.shards import iter_samples
from neuclip.data.synth import synthesize
from neuclip.train import data as D
from neuclip.train.data import EpochOrder, FastTrainTransform, TrainData, TrainLoader, random_order


def add_arguments(parser) -> None:
    parser.add_argument("--work", default="/tmp/neuclip-bench-loader", help="folder for the generated shards")
    parser.add_argument("--samples", type=int, default=1024, help="256 px samples for the throughput runs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes of each loader (best kept)")
    parser.add_argument("--resume-samples", type=int, default=65536, help="32 px samples for the resume timing")
    parser.add_argument("--write", metavar="MD", help="write the result section into this file (docs/benchmarks.md)")


def _shards(work: Path, name: str, num: int, image_size: int, shard_size: int) -> list[str]:
    out = work / f"{name}-{num}-{shard_size}"  # reused only for the same sizes
    if not (out / "manifest.json").exists():
        synthesize(out, num_train=num, num_eval=8, seed=0, shard_size=shard_size, image_size=image_size)
    return sorted(str(p) for p in (out / "train").glob("*.tar"))


def _ours(shards, batch, transform, tokenizer, fast=True):
    loader = D.TrainLoader(
        D.TrainData(shards, seed=0, global_batch=batch, block=1 << 20, skip_bad=False),
        transform=transform,
        tokenizer=tokenizer,
    )
    if not fast:
        loader.dataset.fast = None  # the transform as open_clip gives it (PIL bicubic)
    steps = loader.data.steps_per_epoch
    return lambda: loader.next_batch()[0], steps


def _open_clip(shards, num, batch, transform, tokenizer):
    import open_clip_train.data as ocd
    import webdataset.tariterators as wti

    def expander(src, handler=ocd.log_and_continue):  # the benchmark-only fix, see the module docstring
        files = wti.tar_file_expander(ocd.url_opener(src, handler=handler), handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    ocd.tarfile_to_samples_nothrow = expander
    args = argparse.Namespace(
        train_data="::".join(shards),
        train_num_samples=num,
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        seed=0,
        batch_size=batch,
        world_size=1,
        workers=0,
    )
    info = ocd.get_wds_dataset(args, transform, is_train=True, epoch=0, floor=True, tokenizer=tokenizer)
    it = iter(info.dataloader)
    return lambda: next(it)[0], info.dataloader.num_batches


def _throughput(make, batch) -> float:
    """Samples per CPU-second over one epoch of the loader `make()` builds, its first batch (start-up) not
    counted. CPU time of this one-thread process: what other jobs on a shared machine take does not count."""
    next_batch, steps = make()
    next_batch()
    t0 = time.process_time()
    for _ in range(steps - 1):
        next_batch()
    return (steps - 1) * batch / (time.process_time() - t0)


def _stages(shards, transform, tokenizer, fast) -> dict[str, float]:
    """ms per sample of each stage (best of 3 passes), on the first 256 samples of the first shard."""
    samples = [s for _, s in zip(range(256), iter_samples(Path(shards[0])))]
    images = [open_image(s["jpg"], "jpg") for s in samples]
    texts = [s["txt"].decode() for s in samples]

    def per_sample(fn, items):
        t0 = time.process_time()
        for x in items:
            fn(x)
        return 1e3 * (time.process_time() - t0) / len(items)

    def float_crop(image):  # the same crop, resized in float32 instead of uint8
        from torchvision.transforms import RandomResizedCrop

        i, j, h, w = RandomResizedCrop.get_params(image, fast.scale, fast.ratio)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[:, i : i + h, j : j + w].float()
        return torch.nn.functional.interpolate(x.unsqueeze(0), fast.size, mode="bicubic", antialias=True)

    rrc = transform.transforms[0]  # open_clip's RandomResizedCrop (PIL: crop, then bicubic resize of the crop)
    stages = {
        "read + decode (PIL; verify only where it checks, i.e. PNG)": (lambda s: open_image(s["jpg"], "jpg"), samples),
        "open_clip's whole train transform (PIL)": (transform, images),
        "ours, whole (torch uint8 crop + resize, fused normalise)": (fast, images),
        "crop + resize only: PIL bicubic (open_clip's RandomResizedCrop)": (rrc, images),
        "crop + resize only: torch float32 bicubic antialias": (float_crop, images),
        "crop + resize only: torch uint8 bicubic antialias (ours)": (fast.crop, images),
        "tokenise (batched)": (lambda _: tokenizer(texts), [None]),
    }
    best = {name: float("inf") for name in stages}
    for _ in range(3):  # rounds over all stages, best of each: drift on a shared machine hits all alike
        for name, (fn, items) in stages.items():
            best[name] = min(best[name], per_sample(fn, items))
    best["tokenise (batched)"] /= len(texts)
    return best


def _resume(shards, batch) -> list[tuple[str, float, float]]:
    """(position, seconds to build the data view from the cached index, seconds to the first batch)."""
    rows = []
    for label, epochs in (
        ("epoch 0, step 0", 0),
        ("epoch 0, middle", 0.5),
        ("epoch 0, last step", 1),
        ("epoch 7, last step", 8),
    ):
        t0 = time.perf_counter()
        data = TrainData(shards, seed=0, global_batch=batch, block=1 << 20, skip_bad=False)
        t1 = time.perf_counter()
        step = max(0, round(epochs * data.steps_per_epoch) - (1 if epochs >= 1 else 0))
        TrainLoader(data, start=step).next_batch()
        rows.append((f"{label} (step {step})", t1 - t0, time.perf_counter() - t1))
    return rows


def _scale() -> list[tuple[str, str]]:
    """The order's costs at DFN-1B size (1.4e9 samples in 140,000 shards of 10,000), without the data."""
    ids = np.random.default_rng(0).permutation(10_000_000).astype(np.int64)
    seen, t0 = _Seen(), time.perf_counter()
    for k in range(1000):
        seen.test_and_set(ids[k * 10_000 : (k + 1) * 10_000])
    per_id = (time.perf_counter() - t0) / len(ids)
    t0 = time.perf_counter()
    random_order(1 << 20, 0, "block", 0, 0)
    block = time.perf_counter() - t0
    order = EpochOrder(np.full(140_000, 10_000), seed=0, block=1 << 20)
    t0 = time.perf_counter()
    order.locate(3, 700_000_000, 700_001_024)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    order.locate(3, 700_001_024, 700_002_048)
    again = time.perf_counter() - t0
    return [
        (
            "duplicate-id check (bitmap, 1 bit per id: 175 MB at 1.4e9)",
            f"{per_id * 1e9:.0f} ns per id, "
            f"so {per_id * 1.4e9 / 60:.1f} min at 1.4e9, once per data-set version (the survey is stored; measured on "
            "1e7 ids in 1,000 shards)",
        ),
        ("one block's permutation (2^20 samples, 8 MB)", f"{block:.3f} s, once per block per process"),
        ("positions of a 1024-sample batch, epoch 3 of 1.4e9 (shard order + block)", f"{first:.3f} s"),
        ("the next batch in the same block", f"{again * 1e3:.2f} ms"),
    ]


def _rates(args, shards, transform, tokenizer) -> dict[str, float]:
    """Best samples/s of each loader over `args.repeats` alternating one-epoch passes."""
    loaders = {
        "open_clip_train.data.get_wds_dataset": lambda: _open_clip(
            shards, args.samples, args.batch, transform, tokenizer
        ),
        "neuclip, open_clip's transform as is (PIL bicubic)": lambda: _ours(
            shards, args.batch, transform, tokenizer, fast=False
        ),
        "neuclip (torch uint8 bicubic crop)": lambda: _ours(shards, args.batch, transform, tokenizer),
    }
    best = {name: 0.0 for name in loaders}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every loader alike
        for name, make in loaders.items():
            best[name] = max(best[name], _throughput(make, args.batch))
            print(f"{name}: {best[name]:.0f} samples/s", flush=True)
    return best


def _resume_costs(work: Path, num: int) -> tuple[int, int, float, list]:
    """(samples, shards, seconds to index them cold, rows of `_resume`)."""
    shards = _shards(work, "jpeg32", num, 32, 4096)
    for s in shards:  # a cold index: built from the tars
        for f in Path(s).parent.glob(".neuclip-index/*.npz"):
            f.unlink()
    t0 = time.perf_counter()
    n = int(survey(shards).counts.sum())
    return n, len(shards), time.perf_counter() - t0, _resume(shards, 256)


def _markdown(args, best, stages, resume, scale) -> str:
    n, num_shards, build, rows = resume
    base = best["open_clip_train.data.get_wds_dataset"]
    lines = [
        "## Training data loader (`neuclip bench loader`)",
        "",
        f"Command: `{command_line()}` ({machine_line()}; one thread, no loader workers, timed in the process's "
        "CPU time: samples/s is per core).",
        f"{args.samples} synthetic 256 px JPEG samples (`neuclip data synth --image-size 256`, ~6 kB each: simple "
        "shapes, lighter to decode than photos) in shards of 256, global batch "
        f"{args.batch}; open_clip's ViT-B-32 train transform and tokenizer in both loaders; best of "
        f"{args.repeats} alternating passes of one epoch each.",
        "",
        "| loader | samples/s per core | vs open_clip |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {v:.0f} | {v / base:.2f}x |" for name, v in best.items()]
    lines += ["", "Per sample (CPU ms), same images, best of 3 rounds:", "", "| stage | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in stages.items()]
    lines += [
        "",
        f"Resume: {n} samples (32 px) in {num_shards} shards of 4096, global batch 256. Indexing them cold (tar "
        f"headers plus .txt/.json, once, then cached): {build:.2f} s. Each row builds the data view from the "
        "cached index (survey), then a loader at that step and its first batch (wall-clock):",
        "",
        "| resume at | data view from the index (s) | first batch (s) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {a:.3f} | {b:.3f} |" for label, a, b in rows]
    lines += ["", "The order at DFN-1B size (no data: 140,000 shards of 10,000 counted samples):", ""]
    lines += ["| what | cost |", "|---|---|"] + [f"| {what} | {cost} |" for what, cost in scale]
    lines += [
        "",
        "Notes. The augmentation keeps open_clip's semantics: the crop box comes from torchvision's own "
        "`RandomResizedCrop.get_params` with the same random draws, the crop is cut first and only the crop is "
        "resized, bicubic with antialiasing; only the resize kernel differs (torch's vectorised uint8 kernel "
        "instead of PIL's), and tests/test_train_data.py checks the same box and pixels within 3 levels of "
        "open_clip's output. Issue 12's goal was at least 375 samples/s per core and ahead of open_clip's "
        "pipeline. Photos decode slower than these simple shapes, at the same cost in both loaders. Indexing "
        f"(once per shard, where the data is made, or at a first start) took {1e6 * build / n:.0f} us per sample "
        "here, the survey included (`neuclip bench startup` compares the header scan with tarfile's); the first "
        "row's view is a first start's survey, stored, and the later rows read it back, plus one batch, at any "
        "position.",
    ]
    return "\n".join(lines)


def run(args) -> int:
    import open_clip


    torch.set_num_threads(1)
    work = Path(args.work)
    shards = _shards(work, "jpeg256", args.samples, 256, 256)
    transform = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    best = _rates(args, shards, transform, tokenizer)
    stages = _stages(shards, transform, tokenizer, FastTrainTransform.match(transform))
    body = _markdown(args, best, stages, _resume_costs(work, args.resume_samples), _scale())
    publish(args, "loader", body)
    return 0
