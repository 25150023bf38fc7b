"""The shard checker: each kind of damage is caught and named (shard, key, what to do)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from neuclip.cli import main
from neuclip.data.check import check_shards, format_report


@pytest.fixture
def train(tmp_path, synth_data):
    """A private copy of the synthetic train shards (3 shards x 16 samples), safe to damage. Keys are
    img2dataset's for 16-sample shards: shard * 100 + row in 7 digits (0000104: shard 1, row 4)."""
    return shutil.copytree(synth_data / "train", tmp_path / "train")


def _members(shard):
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf]


def _rewrite(shard, edit):
    """Rewrite `shard` with `edit(name, data)` -> (name, data) or None to drop the member."""
    members = [edited for edited in (edit(n, d) for n, d in _members(shard)) if edited is not None]
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _check(pattern, skip_bad=False):
    report = check_shards(str(pattern), skip_bad=skip_bad)
    return report, format_report(report)


def test_clean_shards_pass(train, synth_data):
    for pattern in (train, train / "{00000..00002}.tar", train / "*.tar"):
        report, text = _check(pattern)
        assert report.ok and not report.problems, text
        assert [s.samples for s in report.shards] == [16, 16, 16]
        assert "total (3 shards)" in text and text.endswith("OK")
    # the eval sets hold captions too but no ids: checked without the id rules, the retrieval set is clean
    eval_set = str(synth_data / "eval" / "wds_synth_retrieval" / "test")
    assert check_shards(eval_set, need_ids=False).ok
    assert "no .json" in check_shards(eval_set).problems[0].reason


@pytest.mark.parametrize("cut", [0.5, 0.9, "header", "marker"])
def test_truncated_tar(train, cut):
    shard = train / "00001.tar"
    data = shard.read_bytes()
    if cut == "header":  # inside the header of the second member: tarfile alone stops silently here
        keep = 512 + -(-len(_members(shard)[0][1]) // 512) * 512 + 100
    elif cut == "marker":  # at a member boundary, only the end-of-archive blocks lost
        keep = len(data.rstrip(b"\0")) + 300
        keep -= keep % 512
    else:
        keep = int(len(data) * cut)
    shard.write_bytes(data[:keep])
    report, text = _check(train)
    assert not report.ok
    assert [(p.shard, p.key) for p in report.problems] == [(str(shard), None)]
    fatal = report.problems
    assert "truncated" in fatal[0].reason and "regenerate" in fatal[0].reason
    skipped = check_shards(str(train), skip_bad=True)  # skipped whole, as the trainer skips it
    assert skipped.ok and [p.key for p in skipped.problems] == [None]


def test_not_a_tar_and_missing_file(train):
    (train / "00000.tar").write_bytes(b"this is not a tar file" * 100)
    report, text = _check(f"{train}/{{00000..00003}}.tar")
    reasons = {p.shard.rsplit("/", 1)[1]: p.reason for p in report.problems}
    assert "not a readable tar" in reasons["00000.tar"]
    assert "file not found" in reasons["00003.tar"]
    assert "FAILED" in text


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: b"\0" * 16 + d[16:], "image .jpg does not decode (UnidentifiedImageError"),
        (lambda d: d[: len(d) // 2], "image .jpg does not decode"),
    ],
    ids=["bad-header", "truncated-jpeg"],
)
def test_undecodable_image(train, edit, expected):
    _rewrite(train / "00000.tar", lambda n, d: (n, edit(d) if n == "0000003.jpg" else d))
    report, text = _check(train)
    assert not report.ok
    (problem,) = report.problems
    assert (problem.shard, problem.key) == (str(train / "00000.tar"), "0000003")
    assert expected in problem.reason
    assert "00000.tar: sample 0000003: image .jpg does not decode" in text and "--skip-bad" in text


def test_empty_and_missing_caption(train):
    def edit(name, data):
        if name == "0000104.txt":
            return name, b"  \n"
        if name == "0000105.txt":
            return None
        return name, data

    _rewrite(train / "00001.tar", edit)
    report, _ = _check(train)
    found = {(p.key, p.reason.split(" (")[0]) for p in report.problems}
    assert found == {("0000104", "empty caption"), ("0000105", "no caption")}


def _set_json_key(train, shard, key, value):
    """Set the .json "key" of sample `key` in `shard` (None: remove the "key"; "!": make it not JSON)."""

    def edit(name, data):
        if name != f"{key}.json":
            return name, data
        if value == "!":
            return name, b"{not json"
        meta = json.loads(data)
        if value is None:
            del meta["key"]
        else:
            meta["key"] = value
        return name, json.dumps(meta).encode()

    _rewrite(train / shard, edit)


def test_duplicate_id_names_both_shards(train):
    _set_json_key(train, "00002.tar", "0000208", "0000005")  # id 5 again, under another member name
    report, _ = _check(train)
    (problem,) = report.problems
    assert problem.shard == str(train / "00002.tar") and problem.key == "0000208"
    assert problem.reason == f"duplicate id 5: also in {train / '00000.tar'} (key 0000005)"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("cat_7", ".json 'key' 'cat_7' is not a non-negative integer"),
        (7.5, ".json 'key' 7.5 is not a non-negative integer"),
        (-7, ".json 'key' -7 is not a non-negative integer"),
        (None, ".json is not an object with a 'key'"),
        ("!", ".json does not parse"),
    ],
    ids=["string", "float", "negative", "no-key", "not-json"],
)
def test_unusable_id(train, value, expected):
    _set_json_key(train, "00000.tar", "0000007", value)
    (problem,) = check_shards(str(train)).problems
    assert problem.key == "0000007" and problem.reason.startswith(expected), problem.reason


def test_member_names_are_not_ids(train):
    """The id is the .json key: a member name that is not digits is fine (webdataset keys are any string)."""
    _rewrite(train / "00000.tar", lambda n, d: (n.replace("0000007", "cat_7"), d))
    assert check_shards(str(train)).ok


def test_count_mismatch_with_sizes_and_stats(train):
    _rewrite(train / "00000.tar", lambda n, d: None if n.startswith("0000000.") else (n, d))
    report, text = _check(train)
    reasons = [p.reason for p in report.problems]
    assert all(p.fatal and p.shard == str(train / "00000.tar") for p in report.problems)
    assert any("sizes.json says 16 samples but the shard has 15" in r for r in reasons)
    assert any("00000_stats.json says 16 samples but the shard has 15" in r for r in reasons)
    assert not check_shards(str(train), skip_bad=True).ok

    sizes = json.loads((train / "sizes.json").read_text())
    del sizes["00002.tar"]
    (train / "sizes.json").write_text(json.dumps(sizes))
    assert any("00002.tar: not listed in" in str(p) for p in check_shards(str(train)).problems)


def test_skip_bad_lists_and_passes(train, capsys):
    _rewrite(train / "00000.tar", lambda n, d: (n, b"" if n == "0000001.txt" else d))
    _rewrite(train / "00001.tar", lambda n, d: (n, b"junk" if n == "0000101.jpg" else d))
    report, text = _check(train, skip_bad=True)
    assert report.ok and len(report.problems) == 2
    assert "skipping: " + str(train / "00000.tar") + ": sample 0000001: empty caption" in text
    assert sum(s.bad for s in report.shards) == 2

    assert main(["data", "check", str(train)]) == 1
    assert main(["data", "check", str(train), "--skip-bad"]) == 0
    assert "sample 0000101: image .jpg does not decode" in capsys.readouterr().out


def test_cli_synth_then_check(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "synth", str(out), "--num-train", "20", "--num-eval", "8", "--shard-size", "8"]) == 0
    assert "20 training samples in 3 shards" in capsys.readouterr().out
    assert main(["data", "check", f"{out}/train/{{00000..00002}}.tar"]) == 0
    text = capsys.readouterr().out
    assert "total (3 shards)" in text and text.rstrip().endswith("OK")
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    assert "synth" in capsys.readouterr().out
