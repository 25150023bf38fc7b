"""Start-up reads what was computed once: the shards' indexes (built under a lock, once, by whoever needs them
first) and their survey (the duplicate-id check included), stored per data-set version."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from neuclip.cli import main
from neuclip.data import check
from neuclip.data.index import INDEX_DIR
from neuclip.data.survey_cache import cached_survey
from neuclip.train.data import TrainData
from neuclip.train.testing import (
    read_checkpoint,
    tensors_equal,
    tiny_config,
    tiny_overrides,
    train_pattern,
    write_config,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def train(tmp_path, synth_data):
    """A private copy of the synthetic train shards (3 x 16 samples) without their indexes."""
    out = shutil.copytree(synth_data / "train", tmp_path / "train")
    shutil.rmtree(out / INDEX_DIR, ignore_errors=True)
    return out


def _shards(folder: Path) -> list[str]:
    return [str(folder / f"{s:05d}.tar") for s in range(3)]


def _damage(folder: Path) -> None:
    """Sample 0000104 gets an empty caption; 0000105's .json takes the id of sample 5 (a duplicate)."""
    shard = folder / "00001.tar"
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            if name == "0000104.txt":
                data = b"  "
            if name == "0000105.json":
                data = json.dumps({**json.loads(data), "key": "0000005"}).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _counting(monkeypatch):
    calls = {"duplicate_check": 0, "index_read": 0}
    real_check, real_index = check._Seen.test_and_set, check.shard_index

    def counted_check(self, ids):
        calls["duplicate_check"] += 1
        return real_check(self, ids)

    def counted_index(path, *a, **k):
        calls["index_read"] += 1
        return real_index(path, *a, **k)

    monkeypatch.setattr(check._Seen, "test_and_set", counted_check)
    monkeypatch.setattr(check, "shard_index", counted_index)
    return calls


def _data(shards):
    return TrainData(shards, seed=0, global_batch=8, block=32, skip_bad=True, report=False, data_size=300)


def test_a_start_after_the_first_does_no_duplicate_check_and_reads_no_index(train, monkeypatch):
    calls = _counting(monkeypatch)
    first = _data(_shards(train))
    assert calls == {"duplicate_check": 3, "index_read": 3}
    again = _data(_shards(train))  # a resume, or another cell on the same shards
    assert calls == {"duplicate_check": 3, "index_read": 3}
    assert again.fingerprint() == first.fingerprint() and again.num_samples == first.num_samples == 48
    (train / "sizes.json").write_text((train / "sizes.json").read_text() + " ")  # a sidecar changed
    _data(_shards(train))
    assert calls == {"duplicate_check": 6, "index_read": 6}
    os.utime(train / "00002.tar", ns=(0, 0))  # a shard changed: its index and the survey are redone
    _data(_shards(train))
    assert calls == {"duplicate_check": 9, "index_read": 9}
    TrainData(_shards(train), seed=0, global_batch=8, block=32, skip_bad=True, report=False, data_size=200)
    assert calls["duplicate_check"] > 9  # another setting (here data_size) is another survey


def test_the_stored_survey_is_the_survey(train):
    _damage(train)
    settings = {"data_size": 300, "data_size_from": "data_size 300", "caption_limit": 8}
    fresh = check.survey(_shards(train), **settings)
    cached_survey(_shards(train), **settings)  # computed and stored
    stored = cached_survey(_shards(train), **settings)  # read back
    assert [str(p) for p in fresh.problems] == [str(p) for p in stored.problems] != []
    assert [p.kind for p in fresh.problems] == [p.kind for p in stored.problems]
    assert fresh.samples == stored.samples and fresh.counts.tolist() == stored.counts.tolist()
    assert [None if u is None else u.tolist() for u in fresh.usable] == [
        None if u is None else u.tolist() for u in stored.usable
    ]
    assert (fresh.max_id, fresh.captions_over) == (stored.max_id, stored.captions_over)
    assert fresh.captions_over > 0 and any(u is not None for u in stored.usable)


def test_missing_indexes_are_built_and_said_or_refused(train, tmp_path, capsys):
    pattern = train_pattern(train.parent)
    code = main(["train", *tiny_overrides(tmp_path / "refused", pattern, train__max_steps=1),
                 "data.missing_index=refuse"])
    err = capsys.readouterr().err
    assert code == 1
    assert "3 of 3 shards have no index or a stale one" in err and f"neuclip data index '{train}'" in err
    assert not (train / INDEX_DIR).exists() or not list((train / INDEX_DIR).glob("*.npz"))
    assert main(["train", *tiny_overrides(tmp_path / "built", pattern, train__max_steps=1)]) == 0
    err = capsys.readouterr().err
    assert "3 of 3 shards have no index or a stale one" in err and "building them now" in err
    assert "rank 0 built 3 shard index(es)" in err
    assert main(["train", *tiny_overrides(tmp_path / "ok", pattern, train__max_steps=1),
                 "data.missing_index=refuse"]) == 0  # they exist now


@pytest.mark.slow
def test_two_trainers_starting_together_build_each_index_once_and_train_alike(train, tmp_path, synth_data):
    """Two `neuclip train` processes on the same unindexed shards: each index built once between them, and
    both runs bit-identical to a run on the pre-built indexes."""
    pattern = train_pattern(train.parent)
    procs, configs = [], []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path / name, pattern, train__max_steps=4)
        configs.append(cfg)
        procs.append(subprocess.Popen([sys.executable, "-m", "neuclip.cli", "train",
                                       str(write_config(tmp_path / f"{name}.yaml", cfg))],
                                      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    built = [int(m) for err in errs for m in re.findall(r"rank 0 built (\d+) shard index", err)]
    assert sum(built) == 3, errs  # one build per shard, whoever did it
    reference = tiny_config(tmp_path / "reference", pattern, train__max_steps=4)
    assert main(["train", str(write_config(tmp_path / "reference.yaml", reference))]) == 0
    ref = read_checkpoint(Path(reference["run_dir"]) / "checkpoints", 4)
    for cfg in configs:
        run = read_checkpoint(Path(cfg["run_dir"]) / "checkpoints", 4)
        for part in ("model", "estimator", "optimizer", "data"):
            assert tensors_equal(ref[part], run[part]) == [], part


def test_index_command_builds_what_is_missing_and_resumes(train, capsys):
    (train / "extra.tar").write_bytes(b"not a tar" * 100)
    assert main(["data", "index", str(train), "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 shards: 3 indexed, 0 already indexed" in out and "1 unreadable" in out
    assert sorted(p.name for p in (train / INDEX_DIR).glob("*.npz")) == [f"{s:05d}.tar.npz" for s in range(3)]
    assert main(["data", "index", str(train)]) == 0
    assert "0 indexed, 3 already indexed" in capsys.readouterr().out
    assert np.load(train / INDEX_DIR / "00000.tar.npz")["ids"].tolist()[:2] == [0, 1]
