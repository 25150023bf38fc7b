"""The synthetic generator: deterministic, img2dataset-shaped train shards, clip_benchmark-readable eval sets."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from neuclip.data.synth import COLOURS, SHAPES, synthesize


def _files(root):
    """What the generator wrote; the shard readers' index cache (.neuclip-index/, made by whoever reads the
    shards first) is not part of it."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".neuclip-index" not in p.parts}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, synth_data):
    again = tmp_path / "again"
    synthesize(again, num_train=48, num_eval=24, seed=0, shard_size=16)
    assert _files(again) == _files(synth_data)  # every tar, json and txt, byte for byte

    other = tmp_path / "other"
    synthesize(other, num_train=48, num_eval=24, seed=1, shard_size=16)
    a, b = _files(synth_data), _files(other)
    assert a.keys() == b.keys()
    assert a["train/00000.tar"] != b["train/00000.tar"]
    assert a["eval/wds_synth_shape/test/0.tar"] != b["eval/wds_synth_shape/test/0.tar"]


def test_layout_manifest_sizes_and_stats(synth_data):
    manifest = json.loads((synth_data / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["train"]["num_samples"] == 48
    assert manifest["train"]["shards"] == [f"train/0000{i}.tar" for i in range(3)]
    assert set(manifest["eval"]) >= {"synth_shape", "synth_colour", "synth_retrieval"}
    sizes = json.loads((synth_data / "train" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 16, "00001.tar": 16, "00002.tar": 16}
    stats = json.loads((synth_data / "train" / "00001_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 16
    assert not list(synth_data.parent.glob(".*partial*"))  # the temp folder was renamed away


def test_train_shards_read_by_webdataset(synth_data):
    url = str(synth_data / "train" / "{00000..00002}.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(48)]
    two_objects = 0
    for s in samples:
        assert {"jpg", "txt", "json"} <= s.keys()
        assert s["jpg"].size == (32, 32) and s["txt"].strip()
        meta = s["json"]
        assert meta["key"] == s["__key__"] and meta["caption"] == s["txt"]
        for obj in meta["objects"]:  # the caption names what was drawn
            assert obj["shape"] in s["txt"] and obj["colour"] in s["txt"]
            assert obj["shape"] in SHAPES and obj["colour"] in COLOURS and obj["colour"] != meta["background"]
        two_objects += len(meta["objects"]) == 2
    assert 0 < two_objects < 48


def test_different_shard_size_same_samples(tmp_path, synth_data):
    out = tmp_path / "one_shard"
    synthesize(out, num_train=48, num_eval=24, seed=0, shard_size=64)
    one = list(wds.WebDataset(str(out / "train" / "00000.tar"), shardshuffle=False))
    three = list(wds.WebDataset(str(synth_data / "train" / "{00000..00002}.tar"), shardshuffle=False))
    assert [s["jpg"] for s in one] == [s["jpg"] for s in three]


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        synthesize(tmp_path, num_train=4, num_eval=2)


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle:UserWarning")  # clip_benchmark's own call
@pytest.mark.parametrize("task", ["synth_shape", "synth_colour", "synth_position"])
def test_classification_sets_load_in_clip_benchmark(synth_data, task):
    from clip_benchmark.datasets.builder import build_dataset

    root = synth_data / "eval" / f"wds_{task}"
    ds = build_dataset(f"wds/{task}", root=str(root), transform=None, task="zeroshot_classification")
    classes = (root / "classnames.txt").read_text().splitlines()
    assert ds.classes == classes and len(classes) >= 6
    assert ds.templates and all("{c}" in t for t in ds.templates)
    items = list(ds)
    assert len(items) == 24
    for image, label in items:
        assert image.size == (32, 32) and 0 <= label < len(classes)


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle:UserWarning")  # clip_benchmark's own call
def test_retrieval_set_loads_in_clip_benchmark(synth_data):
    from clip_benchmark.datasets.builder import build_dataset

    root = synth_data / "eval" / "wds_synth_retrieval"
    ds = build_dataset("wds/synth_retrieval", root=str(root), transform=None, task="zeroshot_retrieval")
    items = list(ds)
    assert len(items) == 24
    for image, texts in items:
        assert image.size == (32, 32)
        assert len(texts) == 5 and len(set(texts)) == 5 and all(t.strip() for t in texts)
