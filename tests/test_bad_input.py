"""Bad input and bad state never cost a run, and get one clear line (issue: bad input). Through the real CLI
entry point, in this process: every kept checkpoint unreadable (stop, nothing deleted, logs intact); the newest
unreadable (resume from the older one, set the bad one aside, end state bit-identical); a locked run folder;
out-of-range arguments."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest
import torch

from neuclip.cli import main
from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import read_checkpoint, tensors_equal, tiny_overrides, train_pattern

torch.set_num_threads(1)


def _train(run_dir: Path, synth_data: Path, **extra) -> int:
    return main(["train", *tiny_overrides(run_dir, train_pattern(synth_data), **extra)])


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    (to / "done.json").unlink()  # an unfinished run, as after a preemption
    return to


def test_every_checkpoint_unreadable_stops_and_deletes_nothing(finished_run, synth_data, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    for _, path in ckpt.list_checkpoints(run / "checkpoints"):
        path.write_bytes(b"not a checkpoint")
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert _train(run, synth_data, train__keep_last=3) == 1
    err = capsys.readouterr().err
    assert "every kept checkpoint in" in err and "nothing was deleted" in err, err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == metrics


def test_newest_checkpoint_unreadable_resumes_from_the_older_bit_identically(finished_run, synth_data, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    newest = ckpt.checkpoint_path(run / "checkpoints", 12)
    newest.write_bytes(b"\x00" * 100)
    assert _train(run, synth_data, train__keep_last=3) == 0
    assert (run / "checkpoints" / (newest.name + ".unreadable")).read_bytes() == b"\x00" * 100  # set aside
    ours, theirs = read_checkpoint(run / "checkpoints", 12), read_checkpoint(finished_run / "checkpoints", 12)
    varying = {"config", "train_wall_s"}  # the run folder's path, and a timing
    assert tensors_equal({k: v for k, v in ours.items() if k not in varying},
                         {k: v for k, v in theirs.items() if k not in varying}) == []
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [4, 8, 12]


def test_a_locked_run_folder_is_one_line(finished_run, synth_data, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert _train(run, synth_data, train__keep_last=3) == 1
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert "another trainer is running in" in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv,named", [
    (["eval", "--batch-size", "0", "--model-dir", "m", "--suite", "tiny", "--out", "o"], "--batch-size"),
    (["data", "synth", "out", "--num-train", "0"], "--num-train"),
])
def test_out_of_range_arguments_are_one_line(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "must be at least 1" in err and "Traceback" not in err, err


@pytest.mark.parametrize("skip_bad", [False, True])
def test_an_id_of_10_to_the_12_gets_the_same_verdict_from_check_and_train(skip_bad, synth_data, tmp_path, capsys):
    """A .json key of 10^12 (beyond train/dataset.yaml's data_size 216): a bad sample for both commands, named;
    skipped with skip_bad, an error without; no command asks for memory by the id."""
    from tests.test_bad_data import _damage

    train = shutil.copytree(synth_data / "train", tmp_path / "train")
    _damage(train, "id-beyond-data-size")
    pattern = train_pattern(train.parent)
    capsys.readouterr()
    assert main(["data", "check", pattern, *(["--skip-bad"] if skip_bad else [])]) == (0 if skip_bad else 1)
    checked = capsys.readouterr().out
    assert "0000103" in checked and "sample id 1000000000000 >= data_size 216 (from" in checked, checked
    run = tmp_path / "run"
    code = main(["train", *tiny_overrides(run, pattern, train__max_steps=2), f"data.skip_bad={str(skip_bad).lower()}"])
    err = capsys.readouterr().err
    assert code == (0 if skip_bad else 1), err
    assert "key 0000103: sample id 1000000000000 >= data_size 216 (from" in err, err
    assert "Traceback" not in err


def test_a_1_mb_one_word_caption_is_cut_and_counted(synth_data, tmp_path, capsys):
    """open_clip's BPE is quadratic in a word's length (a 50,000-letter word took 216 s, and SIGTERM waited for
    it): the caption is read up to data.max_caption_bytes before tokenising, and the cut is counted."""
    import json
    import random
    import string

    from tests.test_bad_data import _member, _rewrite

    train = shutil.copytree(synth_data / "train", tmp_path / "train")
    word = "".join(random.Random(0).choice(string.ascii_lowercase) for _ in range(1 << 20)).encode()
    _rewrite(train / "00001.tar", _member("0000104.txt", lambda d: word))
    run = tmp_path / "run"
    # one epoch (3 steps of 16 of the 48 samples): the long caption's sample is in it
    assert main(["train", *tiny_overrides(run, train_pattern(train.parent), train__max_steps=3)]) == 0
    done = json.loads((run / "done.json").read_text())
    assert done["captions_cut"] == 1 and done["bad_samples"] == 0
    assert done["train_wall_s"] < 60  # seconds for 3 steps; the uncut word alone would take hours
    assert "1 caption(s) longer than 1024 bytes are cut" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: room for a run folder's small files, not for a checkpoint (needs root, as CI has)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_file(small_disk, synth_data, capsys):
    run = small_disk / "run"
    capsys.readouterr()
    assert main(["train", *tiny_overrides(run, train_pattern(synth_data))]) == 1
    err = capsys.readouterr().err
    assert "no space left on device writing" in err and "step_000000004.pt" in err, err
    assert "Traceback" not in err
    assert (run / "config.yaml").exists() and not list((run / "checkpoints").glob(".step_*"))  # no temp left
