"""The synthetic generator: deterministic, img2dataset-shaped train shards, clip_benchmark-readable eval sets."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from neuclip.data.synth import COLOURS, SHAPES, synthesize
from neuclip.train.testing import train_pattern


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
    url = train_pattern(synth_data)
    samples = list(wds.WebDataset(url, shardshuffle=False).decode("pil"))
    # img2dataset's keys for 16-sample shards: shard * 10^2 + row in 5 + 2 digits (neuclip/data/keys.py)
    assert [s["__key__"] for s in samples] == [f"{k:05d}{r:02d}" for k in range(3) for r in range(16)]
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
    """Only the keys depend on the shard size (img2dataset numbers rows within shards); content does not."""
    out = tmp_path / "one_shard"
    synthesize(out, num_train=48, num_eval=24, seed=0, shard_size=64)
    one = list(wds.WebDataset(str(out / "train" / "00000.tar"), shardshuffle=False))
    three = list(wds.WebDataset(train_pattern(synth_data), shardshuffle=False))
    assert [s["jpg"] for s in one] == [s["jpg"] for s in three]
    assert [s["txt"] for s in one] == [s["txt"] for s in three]
    meta = [[{k: v for k, v in json.loads(s["json"]).items() if k != "key"} for s in ss] for ss in (one, three)]
    assert meta[0] == meta[1]  # url, caption, scene, sha256: all but the key
    assert [s["__key__"] for s in one] == [f"{r:07d}" for r in range(48)]  # shard 0, rows 0..47


def test_dataset_yaml_gives_img2dataset_key_space(synth_data):
    """dataset.yaml holds what `neuclip data download` writes for the registry: data_size = max key + 1."""
    import yaml

    from neuclip.data.index import shard_index
    from neuclip.data.keys import data_size_of

    info = yaml.safe_load((synth_data / "train" / "dataset.yaml").read_text())
    assert info["num_samples"] == 48 and info["data_size"] == 216  # last shard 2, rows 0..15: key 215
    assert info["key_scheme"] == "shard * 10^2 + row, 7 digits" and info["shards"] == "{00000..00002}.tar"
    manifest = json.loads((synth_data / "manifest.json").read_text())
    assert manifest["train"]["data_size"] == 216
    shards = [str(synth_data / "train" / f"0000{k}.tar") for k in range(3)]
    ids = sorted(int(i) for s in shards for i in shard_index(s).ids)
    assert ids == [100 * k + r for k in range(3) for r in range(16)] and max(ids) + 1 == info["data_size"]
    assert data_size_of(shards)[0] == 216


def test_key_scheme_edges(tmp_path):
    """Shard size 1 (img2dataset: 10^0 rows per shard, 5-digit keys) and a power of ten (no gaps)."""
    import yaml

    for shard_size, keys, data_size in ((1, ["00000", "00001", "00002"], 3), (10, ["000000", "000001", "000002"], 3)):
        out = tmp_path / f"s{shard_size}"
        synthesize(out, num_train=3, num_eval=2, seed=0, shard_size=shard_size)
        got = [s["__key__"] for name in sorted((out / "train").glob("*.tar"))
               for s in wds.WebDataset(str(name), shardshuffle=False)]  # fmt: skip
        assert got == keys
        assert yaml.safe_load((out / "train" / "dataset.yaml").read_text())["data_size"] == data_size


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
