"""`neuclip data fetch-eval`: offline it fails fast and clearly, sets already there are left alone, and only
the missing ones are fetched (the Hub call itself is replaced here: tests never download)."""

from __future__ import annotations

import socket
import time

import pytest

from neuclip.cli import main as cli
from neuclip.eval import fetch
from neuclip.eval.data import check_task, format_missing
from neuclip.eval.suites import suite_tasks


def _make_wds(root, task, nshards=2):
    """What a finished download of a clip_benchmark wds set leaves (eval's check reads names only)."""
    folder = root / task.folder
    (folder / "test").mkdir(parents=True)
    (folder / "test" / "nshards.txt").write_text(f"{nshards}\n")
    for i in range(nshards):
        (folder / "test" / f"{i}.tar").write_bytes(b"\0" * 1024)
    (folder / "classnames.txt").write_text("a\nb\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_unreachable_hub_fails_fast_and_names_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "endpoint", lambda: f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(fetch, "fetch_task", lambda *a: pytest.fail("nothing may be fetched"))
    start = time.perf_counter()
    assert cli(["data", "fetch-eval", "imagenet_variants", "--root", str(tmp_path), "--timeout", "2"]) == 1
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:" in err and "Connection refused" in err
    assert "7 set(s) missing: imagenet1k, imagenetv2" in err and "HF_ENDPOINT" in err


def test_silent_hub_times_out_after_one_probe(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers: one probe of --timeout, not a hang per file."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # never accept()ed: the kernel completes the handshake, nobody replies
        monkeypatch.setattr(fetch, "endpoint", lambda: f"http://127.0.0.1:{listener.getsockname()[1]}")
        start = time.perf_counter()
        with pytest.raises(fetch.FetchError, match="timed out; probe timeout 1 s"):
            fetch.fetch_eval("imagenet_variants", tmp_path, timeout=1)
        assert time.perf_counter() - start < 4


def test_present_sets_are_left_alone_and_only_missing_ones_fetched(tmp_path, monkeypatch, capsys):
    tasks = suite_tasks("imagenet_variants")
    for task in tasks[1:]:
        _make_wds(tmp_path, task)
    calls = []

    def fake_snapshot_download(**kw):  # what huggingface_hub would be asked; it writes what the Hub holds
        calls.append(kw)
        _make_wds(tmp_path, tasks[0], nshards=3)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(fetch, "probe", lambda url, timeout: None)
    assert fetch.fetch_eval("imagenet_variants", tmp_path, timeout=3) == 0
    assert calls == [{"repo_id": "djghosh/wds_imagenet1k_test", "repo_type": "dataset",
                      "local_dir": tmp_path / "wds_imagenet1k_test", "allow_patterns": fetch.WDS_FILES,
                      "etag_timeout": 3}]  # fmt: skip
    out = capsys.readouterr().out
    assert "6 of 7 data sets present" in out and "present  imagenet-r" in out and "all 7 data sets" in out

    # everything present now: no probe, no fetch, exit 0, even with the Hub unreachable
    monkeypatch.setattr(fetch, "probe", lambda *a: pytest.fail("no probe when nothing is missing"))
    assert cli(["data", "fetch-eval", "imagenet_variants", "--root", str(tmp_path)]) == 0
    assert "7 of 7 data sets present" in capsys.readouterr().out


def test_a_set_still_incomplete_after_fetching_is_an_error(tmp_path, monkeypatch):
    tasks = suite_tasks("imagenet_variants")
    for task in tasks[1:]:
        _make_wds(tmp_path, task)
    monkeypatch.setattr(fetch, "probe", lambda url, timeout: None)
    monkeypatch.setattr(fetch, "fetch_task", lambda task, root, timeout: (root / task.folder).mkdir())
    with pytest.raises(fetch.FetchError, match="imagenet1k: .*not found after fetching"):
        fetch.fetch_eval("imagenet_variants", tmp_path)


def test_offline_mode_and_the_synthetic_suite(tmp_path, monkeypatch, synth_data):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(fetch, "probe", lambda *a: pytest.fail("HF_HUB_OFFLINE: no probe"))
    with pytest.raises(fetch.FetchError, match="HF_HUB_OFFLINE is set and 3 set"):
        fetch.fetch_eval("retrieval", tmp_path)
    assert fetch.fetch_eval("tiny", synth_data) == 0  # generated sets are found where synth wrote them
    with pytest.raises(fetch.FetchError, match="generated, not fetched: neuclip data synth"):
        fetch.fetch_eval("tiny", tmp_path)


def test_eval_missing_data_error_names_fetch_eval(tmp_path):
    tasks = suite_tasks("datacomp38")
    missing = [check_task(t, tmp_path) for t in tasks]
    message = format_missing("datacomp38", tmp_path, missing, len(tasks))
    assert f"neuclip data fetch-eval datacomp38 --root {tmp_path}" in message
