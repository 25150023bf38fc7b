"""The one shard reader: JPEG, PNG and WebP samples read alike by the training loader and the error pass."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from neuclip.data.index import shard_index
from neuclip.data.shards import iter_samples, write_tar
from neuclip.error_study.run_error import ShardImages
from neuclip.train.data import DataError, TrainData, TrainLoader


def _shard(path, formats, blank_caption_at=None):
    samples = []
    for i, fmt in enumerate(formats):
        buf = io.BytesIO()
        Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)).save(buf, format=fmt.upper().replace("JPG", "JPEG"))
        caption = b"  " if i == blank_caption_at else f"caption {i}".encode()
        samples.append((f"{i:09d}", {fmt: buf.getvalue(), "txt": caption, "json": json.dumps({"key": i}).encode()}))
    write_tar(path, samples)
    return str(path)


def test_every_image_format_is_read_by_loader_and_error_pass(tmp_path):
    shard = _shard(tmp_path / "00000.tar", ["jpg", "png", "webp", "jpeg"])
    assert [s["__key__"] for s in iter_samples(tmp_path / "00000.tar")] == [f"{i:09d}" for i in range(4)]
    loader = TrainLoader(TrainData([shard], seed=0, global_batch=4, block=8, skip_bad=False))
    images, texts, ids = loader.next_batch()
    assert sorted(ids.tolist()) == [0, 1, 2, 3] and all(im.size == (6, 6) for im in images)
    embedded = list(ShardImages([shard], transform=lambda im: torch.tensor(im.size)))
    assert [(text, key) for _, text, key in embedded] == [(f"caption {i}", i) for i in range(4)]


def test_error_pass_skips_what_training_skips(tmp_path):
    shard = _shard(tmp_path / "00000.tar", ["png", "webp", "jpg"], blank_caption_at=1)
    assert shard_index(shard).problems == {1: [("sample", "empty caption (.txt holds only whitespace)")]}
    with pytest.raises(ValueError, match="sample 000000001: empty caption"):
        list(ShardImages([shard], transform=lambda im: im.size))
    with pytest.raises(DataError, match="key 000000001: empty caption"):
        TrainData([shard], seed=0, global_batch=2, block=8, skip_bad=False)
    kept = [key for _, _, key in ShardImages([shard], transform=lambda im: im.size, skip_bad=True)]
    data = TrainData([shard], seed=0, global_batch=2, block=8, skip_bad=True)
    assert kept == [0, 2] and sorted(TrainLoader(data).next_batch()[2].tolist()) == kept
