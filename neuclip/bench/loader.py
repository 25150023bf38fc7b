"""`neuclip bench loader`: the training loader's samples/s per core against open_clip's own webdataset
pipeline on the same shards, what each stage of a sample costs, and the time to the first batch after a resume
at the start of an epoch against deep into it.

Everything runs in this process on one thread with no loader workers, so samples/s is per core. Both loaders
get open_clip's ViT-B-32 train transform (RandomResizedCrop 224, scale (0.9, 1), bicubic) and tokenizer.
open_clip's pipeline is `open_clip_train.data.get_wds_dataset`, with one change for the benchmark only: its tar
expander is called with `eof_value=None`, without which webdataset 1.0.2 raises KeyError 'fname' at the end of
each shard (webdataset issue #384).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from neuclip.bench.common import command_line, machine_line, write_section


def add_arguments(parser) -> None:
    parser.add_argument("--work", default="/tmp/neuclip-bench-loader", help="folder for the generated shards")
    parser.add_argument("--samples", type=int, default=1024, help="256 px samples for the throughput runs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes of each loader (best kept)")
    parser.add_argument("--resume-samples", type=int, default=65536, help="32 px samples for the resume timing")
    parser.add_argument("--write", metavar="MD", help="write the result section into this file (docs/benchmarks.md)")


def _shards(work: Path, name: str, num: int, image_size: int, shard_size: int) -> list[str]:
    from neuclip.data.synth import synthesize

    out = work / name
    if not (out / "manifest.json").exists():
        synthesize(out, num_train=num, num_eval=8, seed=0, shard_size=shard_size, image_size=image_size)
    return sorted(str(p) for p in (out / "train").glob("*.tar"))


def _ours(shards, batch, transform, tokenizer, fast=True):
    from neuclip.train import data as D

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
    """samples/s over one epoch of the loader `make()` builds, its first batch (start-up) not counted."""
    next_batch, steps = make()
    next_batch()
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        next_batch()
    return (steps - 1) * batch / (time.perf_counter() - t0)


def _stages(shards, transform, tokenizer, fast) -> dict[str, float]:
    """ms per sample of each stage, on the first 256 samples of the first shard."""
    from neuclip.data.check import open_image
    from neuclip.data.shards import iter_samples

    samples = [s for _, s in zip(range(256), iter_samples(Path(shards[0])))]
    images = [open_image(s["jpg"], "jpg") for s in samples]
    texts = [s["txt"].decode() for s in samples]

    def per_sample(fn, items):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        return 1e3 * (time.perf_counter() - t0) / len(items)

    return {
        "read + decode (PIL, with verify)": per_sample(lambda s: open_image(s["jpg"], "jpg"), samples),
        "augment, open_clip's transform (PIL bicubic)": per_sample(transform, images),
        "augment, ours (torch uint8 bicubic + normalise)": per_sample(fast, images),
        "  of which crop + resize": per_sample(fast.crop, images),
        "tokenise (batched)": 1e3 * _time(lambda: tokenizer(texts)) / len(texts),
    }


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _resume(shards, batch) -> list[tuple[str, float, float]]:
    """(position, seconds to build the data view from the cached index, seconds to the first batch)."""
    from neuclip.train.data import TrainData, TrainLoader

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


def run(args) -> int:
    import open_clip

    torch.set_num_threads(1)
    from neuclip.train.data import FastTrainTransform

    work = Path(args.work)
    shards = _shards(work, "jpeg256", args.samples, 256, 256)
    transform = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    fast = FastTrainTransform.match(transform)
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
    stages = _stages(shards, transform, tokenizer, fast)

    resume_shards = _shards(work, "jpeg32", args.resume_samples, 32, 4096)
    t0 = time.perf_counter()
    from neuclip.data.check import survey

    for s in resume_shards:  # a cold index: built from the tars
        for f in Path(s).parent.glob(".neuclip-index/*.npz"):
            f.unlink()
    survey(resume_shards)
    build = time.perf_counter() - t0
    resume = _resume(resume_shards, 256)

    base = best["open_clip_train.data.get_wds_dataset"]
    lines = [
        "## Training data loader (`neuclip bench loader`)",
        "",
        f"Command: `{command_line()}` ({machine_line()}, one thread, no loader workers: samples/s is per core).",
        f"{args.samples} synthetic 256 px JPEG samples (`neuclip data synth --image-size 256`, ~6 kB each: simple "
        "shapes, lighter to decode than photos) in shards of 256, global batch "
        f"{args.batch}; open_clip's ViT-B-32 train transform and tokenizer in both loaders; best of "
        f"{args.repeats} alternating passes of one epoch each.",
        "",
        "| loader | samples/s per core | vs open_clip |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {v:.0f} | {v / base:.2f}x |" for name, v in best.items()]
    lines += ["", "Per sample (ms), same images:", "", "| stage | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in stages.items()]
    lines += [
        "",
        f"Resume: {args.resume_samples} samples (32 px) in {len(resume_shards)} shards of 4096, global batch 256. "
        f"Indexing them cold (tar headers plus .txt/.json, once, then cached): {build:.2f} s. Each row builds the "
        "data view from the cached index (survey), then a loader at that step and its first batch:",
        "",
        "| resume at | data view from the index (s) | first batch (s) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {a:.3f} | {b:.3f} |" for label, a, b in resume]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, "loader", body)
    return 0
