"""The training data stream: seeded order, exact resume, slot layout independent of ranks x workers."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from neuclip.train.data import (
    DataError,
    Loader,
    SlotReader,
    TrainStream,
    expand_shards,
    fresh_position,
    scan_shard,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tools():
    from neuclip.export import create_model

    _, train_tf, _, tokenizer = create_model("tiny-vit")
    return train_tf, tokenizer


def _shards(data: Path) -> list[str]:
    return expand_shards(str(data / "train" / "{00000..00002}.tar"))


def _stream(shards, tools, *, rank=0, world=1, workers=0, chunk=8, positions=None, buffer=16, seed=0, skip_bad=False):
    slots = world * max(1, workers)
    return TrainStream(
        shards,
        seed=seed,
        rank=rank,
        world_size=world,
        workers=workers,
        chunk_size=chunk,
        positions=positions or [fresh_position() for _ in range(slots)],
        shuffle_buffer=buffer,
        skip_bad=skip_bad,
        transform=tools[0],
        tokenizer=tools[1],
    )


def _batches(loader: Loader, n: int) -> list[tuple]:
    out = [loader.next_batch() for _ in range(n)]
    return out


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb)) and len(a) == len(b)


def test_order_is_seeded_and_a_pass_is_a_permutation(synth_data, tools):
    shards = _shards(synth_data)
    first = _batches(Loader(_stream(shards, tools)), 12)
    again = _batches(Loader(_stream(shards, tools)), 12)
    assert _same(first, again)
    other = _batches(Loader(_stream(shards, tools, seed=1)), 12)
    assert not torch.equal(torch.cat([b[2] for b in first]), torch.cat([b[2] for b in other]))
    ids = torch.cat([b[2] for b in first])
    assert sorted(ids[:48].tolist()) == list(range(48))  # pass 0: every sample once
    assert sorted(ids[48:].tolist()) == list(range(48))  # pass 1: again, in another order
    assert ids[:48].tolist() != ids[48:].tolist()
    assert first[0][0].shape == (8, 3, 32, 32) and first[0][1].shape == (8, 32)


def test_ids_come_from_the_json_key(synth_data, tools):
    shards = _shards(synth_data)
    reader = SlotReader(shards, seed=0, slot=0, num_slots=1, shuffle_buffer=0, skip_bad=False)
    records = reader.records(fresh_position())
    for _ in range(5):
        rec, _, _ = next(records)
        _, text, sample_id = reader.decode(rec, 0)
        with tarfile.open(shards[rec[0]]) as tf:
            meta = json.load(tf.extractfile(f"{rec[1]}.json"))
        assert sample_id == int(meta["key"]) and isinstance(text, str)


def test_resume_from_a_position_continues_exactly(synth_data, tools):
    shards = _shards(synth_data)
    straight = Loader(_stream(shards, tools, workers=2, chunk=4))
    expected = _batches(straight, 15)
    first = Loader(_stream(shards, tools, workers=2, chunk=4))
    _batches(first, 7)
    positions = [first.positions[s] for s in range(2)]
    first.close()
    resumed = Loader(_stream(shards, tools, workers=2, chunk=4, positions=positions))
    assert _same(expected[7:], _batches(resumed, 8))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world,workers", [(2, 1), (2, 0), (4, 1)])
def test_global_batches_depend_only_on_the_number_of_slots(synth_data, tools, world, workers):
    """1 process x S workers == S processes x 1 worker: same global batches, same order (S < shards: by
    shard; S > shards: by sample)."""
    shards = _shards(synth_data)
    slots = world * max(1, workers)
    single = _batches(Loader(_stream(shards, tools, workers=slots, chunk=16 // slots)), 6)
    ranks = [
        _batches(Loader(_stream(shards, tools, rank=r, world=world, workers=workers, chunk=16 // slots)), 6)
        for r in range(world)
    ]
    merged = [tuple(torch.cat([ranks[r][t][i] for r in range(world)]) for i in range(3)) for t in range(6)]
    assert _same(single, merged)
    ids = torch.cat([b[2] for b in single])
    assert len(set(ids[:32].tolist())) == 32  # slots read disjoint parts of the data


def test_corrupt_shard_raises_naming_it_or_is_counted_once(synth_data, tools, tmp_path):
    import shutil

    shutil.copytree(synth_data / "train", tmp_path / "train")
    bad = tmp_path / "train" / "00001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    shards = _shards(tmp_path)
    with pytest.raises(DataError, match="00001.tar"):
        list(scan_shard(str(bad)))
    with pytest.raises(DataError, match=r"00001\.tar.*data\.skip_bad"):
        _batches(Loader(_stream(shards, tools)), 8)
    loader = Loader(_stream(shards, tools, skip_bad=True))
    batches = _batches(loader, 12)  # three passes over the 40 readable samples
    assert loader.bad_counts() == {"bad_samples": 0, "bad_shards": 1}  # once, not once per pass
    ids = torch.cat([b[2] for b in batches])
    assert ids.max() < 48 and len(set(ids.tolist())) < 48
    # the count survives a resume from the position
    resumed = Loader(_stream(shards, tools, skip_bad=True, positions=[loader.positions[0]]))
    resumed.next_batch()
    assert resumed.bad_counts()["bad_shards"] == 1
