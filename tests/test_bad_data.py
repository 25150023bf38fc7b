"""One definition of bad data: `neuclip data check` and the trainer's loader give the same verdict on each case
(an error naming shard and key; with skip_bad, skipped and counted; a count mismatch always an error)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import torch

from neuclip.data.check import check_shards
from neuclip.data.keys import data_size_of
from neuclip.train.data import DataError, TrainData, TrainLoader

torch.set_num_threads(1)


def _rewrite(shard, edit):
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w") as tf:
        for name, data in filter(None, (edit(n, d) for n, d in members)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _json_key(value):
    def edit(data):
        meta = json.loads(data)
        if value is None:
            del meta["key"]
        else:
            meta["key"] = value
        return json.dumps(meta).encode()

    return edit


def _member(name, change):
    return lambda n, d: (n, change(d)) if n == name else (n, d)


# case -> (shard, member-level edit, the key named, id that must leave the epoch or None). synth_data's keys are
# img2dataset's for 16-sample shards: shard * 100 + row in 7 digits (0000104: shard 1, row 4; its id is 104).
CASES = {
    "duplicate-id": ("00002.tar", _member("0000208.json", _json_key("0000005")), "0000208", None),
    "blank-caption": ("00001.tar", _member("0000104.txt", lambda d: b" \t\n "), "0000104", 104),
    "json-without-key": ("00000.tar", _member("0000007.json", _json_key(None)), "0000007", None),
    "non-integer-key": ("00000.tar", _member("0000007.json", _json_key("7a")), "0000007", None),
    "missing-image": ("00001.tar", lambda n, d: None if n == "0000105.jpg" else (n, d), "0000105", 105),
    "undecodable-image": ("00002.tar", _member("0000202.jpg", lambda d: b"not a jpeg" * 8), "0000202", 202),
    "truncated-shard": ("00001.tar", None, None, None),
    # an absurd key: beyond data_size (train/dataset.yaml's, as the trainer's default) in both verdicts, and the
    # duplicate check's memory stays bounded (a bitmap up to 10^12 asked for 116 GiB)
    "id-beyond-data-size": ("00001.tar", _member("0000103.json", _json_key("1000000000000")), "0000103", 103),
}


@pytest.fixture
def train(tmp_path, synth_data):
    return shutil.copytree(synth_data / "train", tmp_path / "train")


def _damage(train, case):
    shard, edit, _, _ = CASES[case]
    path = train / shard
    if edit is None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        _rewrite(path, edit)
        sizes = json.loads((train / "sizes.json").read_text())
        with tarfile.open(path) as tf:
            n = len({m.name.split(".")[0] for m in tf})
        (train / path.name.replace(".tar", "_stats.json")).write_text(json.dumps({"successes": n}))
        (train / "sizes.json").write_text(json.dumps({**sizes, shard: n}))
    return [str(train / f"0000{i}.tar") for i in range(3)]


def _epoch_ids(data) -> list[int]:
    loader = TrainLoader(data)
    ids = torch.cat([loader.next_batch()[2] for _ in range(data.steps_per_epoch)]).tolist()
    return ids, loader


@pytest.mark.parametrize("case", list(CASES))
def test_checker_and_trainer_agree(train, case):
    shards = _damage(train, case)
    shard, _, key, gone = CASES[case]
    named = f"shard {train / shard}" + (f" key {key}" if key else "")

    # the checker: names the shard and key; with --skip-bad, lists it as skipped and passes
    report = check_shards(str(train))
    assert not report.ok
    (problem,) = report.problems
    assert (problem.shard, problem.key) == (str(train / shard), key) and not problem.fatal
    assert check_shards(str(train), skip_bad=True).ok

    # the trainer: the same shard and key in its error; with skip_bad, skipped and counted
    def trainer(skip_bad):  # data.data_size as the config resolves it by default (dataset.yaml beside the shards)
        data = TrainData(shards, seed=0, global_batch=4, block=64, skip_bad=skip_bad, data_size=data_size_of(shards)[0])
        return data, *_epoch_ids(data)

    with pytest.raises(DataError) as err:
        trainer(skip_bad=False)
    assert named in str(err.value) and "data.skip_bad" in str(err.value), str(err.value)
    assert problem.reason in str(err.value)  # the same words

    data, ids, loader = trainer(skip_bad=True)
    counts = loader.bad_counts()
    expected = {"bad_samples": 0, "bad_shards": 1} if key is None else {"bad_samples": 1, "bad_shards": 0}
    assert counts == {**expected, "captions_cut": 0}
    if case == "undecodable-image":  # found when decoded: a stand-in keeps the batch size, its id stays unique
        assert data.num_samples == 48 and len(set(ids)) == len(ids)
    else:
        assert data.num_samples == 48 - (16 if key is None else 1)
        assert len(ids) == len(set(ids)) == data.steps_per_epoch * 4
        if gone is not None:
            assert gone not in ids


def test_overstated_sizes_json_is_an_error_naming_the_file(train):
    """The epoch length comes from the index; sizes.json is only cross-checked, never trusted."""
    sizes_file = train / "sizes.json"
    sizes = json.loads(sizes_file.read_text())
    sizes_file.write_text(json.dumps({**sizes, "00001.tar": 30}))
    shards = [str(train / f"0000{i}.tar") for i in range(3)]
    expected = f"{sizes_file} says 30 samples but the shard has 16"

    for skip_bad in (False, True):
        report = check_shards(str(train), skip_bad=skip_bad)
        (problem,) = report.problems
        assert not report.ok and problem.fatal and expected in problem.reason
        with pytest.raises(DataError, match="never skipped") as err:
            TrainData(shards, seed=0, global_batch=4, block=64, skip_bad=skip_bad)
        assert f"shard {train / '00001.tar'}: {expected}" in str(err.value)

    sizes_file.write_text(json.dumps(sizes))
    assert TrainData(shards, seed=0, global_batch=4, block=64, skip_bad=False).steps_per_epoch == 12


def test_an_absurd_id_without_a_declared_id_space_is_refused_by_both(train):
    """No dataset.yaml: the id space would be max id + 1 = 10^12 + 1; the checker and the trainer's config both
    refuse it, naming the shard and key, instead of sizing state (or a bitmap) by it."""
    _damage(train, "id-beyond-data-size")
    (train / "dataset.yaml").unlink()
    report = check_shards(str(train))
    (problem,) = report.problems
    assert problem.fatal and "key 0000103: sample id 1000000000000 lies far beyond" in problem.reason
    assert not check_shards(str(train), skip_bad=True).ok  # never skippable: the id space itself is unknown
    with pytest.raises(ValueError, match="key 0000103: sample id 1000000000000 lies far beyond"):
        data_size_of([str(train / f"0000{i}.tar") for i in range(3)])
    # given the id space, the sample is one bad sample again
    assert check_shards(str(train), skip_bad=True, data_size=216).ok
