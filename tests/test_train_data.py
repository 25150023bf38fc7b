"""The training data order: a function of (seed, shards, global batch, step) only; every sample once an epoch;
the same batches bit for bit with any number of loader workers or ranks, and across a resume that changes them."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuclip.data.index import INDEX_DIR, shard_index
from neuclip.data.shards import write_tar
from neuclip.train.data import DataError, EpochOrder, FastTrainTransform, TrainData, TrainLoader, resume_point

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tools():
    from neuclip.export import create_model

    _, train_tf, _, tokenizer = create_model("tiny-vit")
    return train_tf, tokenizer


def img2dataset_shards(folder: Path, sizes: list[int], image_size: int = 8, skip_every: int = 5) -> list[str]:
    """Shards laid out as img2dataset writes them: keys = shard * 10^4 + i as 9 zero-padded digits, every
    `skip_every`-th sample absent (a failed download), .json with status/error_message, _stats.json and
    .parquet sidecars, sizes.json. Returns the shard paths; ids are the keys as integers."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(sizes))
    counts = {}
    for s, n in enumerate(sizes):
        samples, i = [], 0
        while len(samples) < n:
            i += 1
            if i % skip_every == 0:
                continue  # failed sample: img2dataset leaves it out of the tar
            key = f"{s * 10_000 + i:09d}"
            buf = io.BytesIO()
            pixels = rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            meta = {
                "url": f"http://x/{key}",
                "caption": f"c {key}",
                "key": key,
                "status": "success",
                "error_message": None,
                "width": image_size,
                "height": image_size,
            }
            samples.append(
                (key, {"jpg": buf.getvalue(), "txt": f"c {key}".encode(), "json": json.dumps(meta).encode()})
            )
        counts[f"{s:05d}.tar"] = write_tar(folder / f"{s:05d}.tar", samples)
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"successes": n, "count": i}))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1 not read PAR1")
    (folder / "sizes.json").write_text(json.dumps(counts))
    return [str(folder / name) for name in counts]


def _ids(shards) -> list[int]:
    return sorted(i for s in shards for i in shard_index(s).ids.tolist())


def _data(shards, B=8, block=16, seed=0, skip_bad=False):
    return TrainData(shards, seed=seed, global_batch=B, block=block, skip_bad=skip_bad)


def _batches(data, steps, **kw):
    loader = TrainLoader(data, **kw)
    try:
        return [loader.next_batch() for _ in range(steps)], loader.state()
    finally:
        loader.close()


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y) for ba, bb in zip(a, b) for x, y in zip(ba, bb)
    )


@pytest.mark.parametrize("sizes, B, block", [([7, 13, 5, 11], 6, 5), ([7, 13, 5, 11], 9, 1000), ([3, 17, 16], 4, 7)])
def test_every_sample_exactly_once_per_epoch(tmp_path, sizes, B, block):
    shards = img2dataset_shards(tmp_path / "d", sizes)
    data = _data(shards, B=B, block=block)
    n = sum(sizes)
    assert data.num_samples == n and data.steps_per_epoch == n // B
    per_epoch = data.steps_per_epoch
    batches, _ = _batches(data, 4 * per_epoch)
    ids = [torch.cat([b[2] for b in batches[e * per_epoch : (e + 1) * per_epoch]]).tolist() for e in range(4)]
    every = _ids(shards)
    for epoch in ids:
        assert len(set(epoch)) == len(epoch) == per_epoch * B  # never twice in an epoch
        if n % B == 0:
            assert sorted(epoch) == every  # ... and all of them when B divides N
        else:
            assert set(epoch) <= set(every)
    assert len({tuple(e) for e in ids}) == 4  # each epoch its own order
    other, _ = _batches(_data(shards, B=B, block=block, seed=1), per_epoch)
    assert torch.cat([b[2] for b in other]).tolist() != ids[0]


def test_epoch_order_is_a_bijection_blockwise():
    counts = np.array([0, 5, 1, 9, 4, 0, 3])
    order = EpochOrder(counts, seed=3, block=4)
    for epoch in range(3):
        shard, nth = order.locate(epoch, 0, order.total)
        pairs = sorted(zip(shard.tolist(), nth.tolist()))
        assert pairs == [(s, i) for s in range(len(counts)) for i in range(counts[s])]
        # any slice of positions agrees with the whole (what a rank or a resume asks for)
        s2, n2 = order.locate(epoch, 5, 17)
        assert s2.tolist() == shard[5:17].tolist() and n2.tolist() == nth[5:17].tolist()
    with pytest.raises(IndexError):
        order.locate(0, 20, 23)


@pytest.mark.slow  # loader worker processes
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_same_global_batches_with_any_workers_and_ranks(synth_data, tools):
    shards = [str(synth_data / "train" / f"0000{i}.tar") for i in range(3)]
    data = _data(shards, B=8, block=20)
    kw = dict(transform=tools[0], tokenizer=tools[1])
    ref, _ = _batches(data, 9, workers=0, **kw)  # 9 steps: into the second epoch
    assert ref[0][0].shape == (8, 3, 32, 32) and ref[0][1].shape == (8, 32) and ref[0][1].dtype == torch.int64
    for workers in (1, 2, 3):
        assert _same(ref, _batches(data, 9, workers=workers, **kw)[0]), workers
    for world, workers in ((2, 0), (4, 3)):
        parts = [_batches(data, 9, rank=r, world=world, workers=workers, **kw)[0] for r in range(world)]
        merged = [tuple(torch.cat([parts[r][t][i] for r in range(world)]) for i in range(3)) for t in range(9)]
        assert _same(ref, merged), (world, workers)


@pytest.mark.slow  # loader worker processes
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_that_changes_workers_and_world_is_bit_identical(synth_data, tools):
    shards = [str(synth_data / "train" / f"0000{i}.tar") for i in range(3)]
    data = _data(shards, B=8, block=20)
    kw = dict(transform=tools[0], tokenizer=tools[1])
    straight, _ = _batches(data, 14, workers=2, **kw)
    _, state = _batches(data, 5, workers=2, **kw)
    assert state["next_step"] == 5
    start, bad = resume_point(state, data, rank=0, source="ckpt")
    assert _same(straight[5:], _batches(data, 9, workers=3, start=start, bad_decoded=bad, **kw)[0])
    halves = [_batches(data, 9, rank=r, world=2, workers=1, start=start, **kw)[0] for r in range(2)]
    merged = [tuple(torch.cat([halves[r][t][i] for r in range(2)]) for i in range(3)) for t in range(9)]
    assert _same(straight[5:], merged)


def test_resume_refuses_other_data_and_the_old_format(tmp_path):
    shards = img2dataset_shards(tmp_path / "d", [6, 6])
    data = _data(shards, B=4)
    state = TrainLoader(data).state()
    assert resume_point(state, data, 0, "ckpt") == (0, 0)
    with pytest.raises(DataError, match="earlier slot-based data loader"):
        resume_point({"num_slots": 2, "positions": []}, data, 0, "ckpt-old")
    with pytest.raises(DataError, match="global_batch: 4 -> 6"):
        resume_point(state, _data(shards, B=6), 0, "ckpt")
    with pytest.raises(DataError, match="fingerprint"):
        resume_point(state, _data(shards[:1] + shards, B=4, skip_bad=True), 0, "ckpt")


def test_ids_are_the_json_keys_and_sidecars_are_ignored(tmp_path):
    shards = img2dataset_shards(tmp_path / "d", [6, 9])
    batches, _ = _batches(_data(shards, B=5), 3)
    ids = sorted(torch.cat([b[2] for b in batches]).tolist())
    assert ids == _ids(shards) and ids[:5] == [1, 2, 3, 4, 6] and 10_001 in ids  # gaps where downloads failed
    texts = [t for b in batches for t in b[1]]
    assert sorted(texts) == sorted(f"c {i:09d}" for i in ids)


def test_index_is_cached_beside_the_shards_or_in_the_cache_dir(tmp_path, monkeypatch):
    from neuclip.data import index as sh

    shards = img2dataset_shards(tmp_path / "d", [4])
    beside = Path(shards[0]).parent / INDEX_DIR / "00000.tar.npz"
    sh.shard_index(shards[0])
    assert beside.is_file()
    calls = []
    real = sh.build_index
    monkeypatch.setattr(sh, "build_index", lambda p: calls.append(p) or real(p))
    sh.shard_index(shards[0])
    assert calls == []  # cached: no scan
    os.utime(shards[0], ns=(0, 0))  # the shard changed: rebuilt
    sh.shard_index(shards[0])
    assert len(calls) == 1

    ro = img2dataset_shards(tmp_path / "ro", [4])
    monkeypatch.setenv("NEUCLIP_INDEX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ro" / INDEX_DIR).write_text("")  # the index folder cannot be made there (as if read-only)
    first = sh.shard_index(ro[0])
    (cached,) = (tmp_path / "cache").rglob("00000.tar.npz")
    assert sh._load(cached, Path(ro[0]), sh._stamp(Path(ro[0]))).ids.tolist() == first.ids.tolist()


def test_fast_transform_keeps_open_clip_augmentation(tools):
    """Same crop box as open_clip's RandomResizedCrop for the same seed; pixels within a level or two."""
    from neuclip.export import create_model

    _, train_tf, _, _ = create_model("ViT-B-32")
    fast = FastTrainTransform.match(train_tf)
    assert fast is not None and FastTrainTransform.match(tools[0]) is not None
    _, _, eval_tf, _ = create_model("tiny-vit")
    assert FastTrainTransform.match(eval_tf) is None  # anything else runs as it is
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.repeat(np.repeat(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8), 8, 0), 8, 1))
    std = torch.tensor(train_tf.transforms[-1].std).view(3, 1, 1)
    for seed in range(5):
        torch.manual_seed(seed)
        ours = fast(image)
        torch.manual_seed(seed)
        theirs = train_tf(image)
        levels = ((ours - theirs) * std * 255).abs()
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert levels.max() <= 3 and levels.mean() < 0.3, (levels.max(), levels.mean())


def test_augmentation_depends_on_position_not_on_the_decoder(synth_data, tools):
    shards = [str(synth_data / "train" / f"0000{i}.tar") for i in range(3)]
    data = _data(shards, B=8, block=20)
    batches, _ = _batches(data, 12, transform=tools[0], tokenizer=tools[1])
    ids = torch.cat([b[2] for b in batches])
    images = torch.cat([b[0] for b in batches])
    first, second = images[:48][ids[:48].argsort()], images[48:][ids[48:].argsort()]
    assert not torch.equal(first, second)  # another epoch: other crops of the same samples
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again, _ = _batches(data, 12, transform=tools[0], tokenizer=tools[1])
    assert _same(batches, again)  # the caller's RNG state does not enter ...
    assert torch.equal(torch.get_rng_state(), before)  # ... nor is it drawn from (a resume would then diverge)
