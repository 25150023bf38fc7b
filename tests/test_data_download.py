"""`neuclip data download` end to end with no internet: img2dataset itself fetches synthetic images from a
loopback HTTP server (with a 404, a timeout, a truncated JPEG and a non-image among them); then the checker,
the trainer and the error pass read what it wrote, and its layout is diffed against the synthetic generator's.

Needs img2dataset's own environment (`make img2dataset`); with CI=true a missing one fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from neuclip.cli import main as cli
from neuclip.data import download as dl
from neuclip.data import keys

pytestmark = pytest.mark.slow

try:
    dl.img2dataset_python()
except dl.DownloadError as err:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(str(err), allow_module_level=True)

TIMEOUT = 2  # img2dataset's per-request timeout (s); the slow URL answers after SLOW s at most
SLOW = 8
PER_SHARD = 8  # -> keys shard * 10 + row (img2dataset: 10^ceil(log10 8)), 6 digits with 5-digit shard names


class _Httpd(ThreadingHTTPServer):
    request_queue_size = 64  # the default backlog of 5 drops some of img2dataset's 8 threads' connections
    daemon_threads = True


class Server:
    """127.0.0.1 on a free port; `routes` maps a path to (status, content type, body). The slow path waits
    until SLOW s pass or the server stops, so stopping never waits on it."""

    def __init__(self, routes: dict[str, tuple[int, str, bytes]]):
        self.routes, self.stopping, self.hits = routes, threading.Event(), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                outer.hits.append(self.path)
                if self.path == "/slow.jpg":
                    outer.stopping.wait(SLOW)
                status, ctype, body = outer.routes.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (the timeout case)

            def log_message(self, *args):
                pass

        self.httpd = _Httpd(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _synthetic_images(root: Path, n: int) -> list[tuple[str, bytes, dict]]:
    """(caption, jpg bytes, .json) of the synthetic generator's first n training samples."""
    from neuclip.data.shards import iter_samples
    from neuclip.data.synth import synthesize

    synthesize(root, num_train=n, num_eval=4, seed=0, shard_size=n)
    return [(s["txt"].decode(), s["jpg"], json.loads(s["json"])) for s in iter_samples(root / "train" / "00000.tar")]


GOOD = 20
BAD = {  # path -> what img2dataset should make of it: (status, reason fragment)
    "/missing.jpg": ("failed_to_download", "404"),
    "/slow.jpg": ("failed_to_download", "timed out"),
    "/truncated.jpg": ("failed_to_resize", "Image decoding error"),
    "/page.jpg": ("failed_to_resize", "Image decoding error"),
}


def _routes(images) -> dict:
    routes = {f"/img/{i}.jpg": (200, "image/jpeg", jpg) for i, (_, jpg, _) in enumerate(images)}
    routes["/truncated.jpg"] = (200, "image/jpeg", images[0][1][: len(images[0][1]) * 6 // 10])
    routes["/page.jpg"] = (200, "text/html", b"<html><body>this is not an image</body></html>")
    routes["/slow.jpg"] = (200, "image/jpeg", images[1][1])
    return routes


def _rows(server, images) -> list[dict]:
    """The URL list: good images with the four bad URLs spread over the shards."""
    rows = [{"caption": c, "url": server.url(f"/img/{i}.jpg")} for i, (c, _, _) in enumerate(images)]
    for at, path in zip((3, 9, 14, 21), BAD):
        rows.insert(at, {"caption": f"bad {path}", "url": server.url(path)})
    return rows


SETTINGS = [
    f"--set=number_sample_per_shard={PER_SHARD}", "--set=processes_count=1", "--set=thread_count=8",
    f"--set=timeout={TIMEOUT}", "--set=image_size=32",
]  # fmt: skip


@pytest.fixture(scope="module")
def tsv_download(tmp_path_factory):
    """A CC3M-style TSV (caption<TAB>url header) through `neuclip data download cc3m`."""
    tmp = tmp_path_factory.mktemp("download")
    images = _synthetic_images(tmp / "synth", GOOD)
    with Server(_routes(images)) as server:
        rows = _rows(server, images)
        url_list = tmp / "urls.tsv"
        url_list.write_text("caption\turl\n" + "".join(f"{r['caption']}\t{r['url']}\n" for r in rows))
        start = time.perf_counter()
        assert cli(["data", "download", "cc3m", "--url-list", str(url_list), "--out", str(tmp / "out"), *SETTINGS]) == 0
        seconds = time.perf_counter() - start
    return {"out": tmp / "out", "rows": rows, "images": images, "synth": tmp / "synth", "seconds": seconds,
            "url_list": url_list}  # fmt: skip


def _members(tar: Path) -> list[str]:
    with tarfile.open(tar) as tf:
        return [m.name for m in tf.getmembers()]


def test_failures_counted_as_served(tsv_download):
    out, rows = tsv_download["out"], tsv_download["rows"]
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    stats = dl.read_stats(out, 5)
    assert [s.name for s in stats] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(s.count for s in stats) == len(rows) == GOOD + len(BAD)
    assert sum(s.successes for s in stats) == info["num_samples"] == GOOD
    assert sum(s.failed_to_download for s in stats) == 2 and sum(s.failed_to_resize for s in stats) == 2
    reasons = " | ".join(f"{r} x{n}" for r, n in info["failures"].items())
    assert "404" in reasons and "Image decoding error x2" in reasons and "timed out" in reasons.lower(), reasons
    assert json.loads((out / "sizes.json").read_text()) == {s.name: s.successes for s in stats}
    # data_size from img2dataset's key scheme: last shard 2 holds rows 0..7 -> max key 27 -> 28
    assert info["data_size"] == 28 and info["shards"] == str(out / "{00000..00002}.tar")
    report = (out / "download_report.md").read_text()
    assert "| 00001.tar | 8 |" in report and "failure reason" in report

    # What img2dataset wrote, row by row: failed rows are absent from the tars, keys follow its scheme.
    found = {}
    for s in stats:
        for name in _members(out / s.name):
            found.setdefault(name.split(".")[0], set()).add(name.split(".", 1)[1])
    assert all(exts == {"jpg", "txt", "json"} for exts in found.values())
    expected = {keys.img2dataset_key(r // PER_SHARD, r % PER_SHARD, PER_SHARD, 5) for r, row in enumerate(rows)
                if "/img/" in row["url"]}  # fmt: skip
    assert set(found) == expected and max(int(k) for k in found) < info["data_size"]


def test_check_passes_and_loader_reads_the_shards(tsv_download):
    from neuclip.train.data import TrainData, expand_shards

    out = tsv_download["out"]
    assert cli(["data", "check", str(out)]) == 0
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    data = TrainData(expand_shards(info["shards"]), seed=0, global_batch=8, block=16, skip_bad=False, report=False)
    assert data.num_samples == GOOD and data.max_id < info["data_size"]


def test_train_and_error_run_on_img2dataset_shards(tsv_download, tmp_path):
    """fastclip keeps per-sample state indexed by id: the sparse img2dataset ids must fit data_size."""
    from neuclip.error_study.tracking import train
    from neuclip.train.testing import tiny_config

    info = yaml.safe_load((tsv_download["out"] / "dataset.yaml").read_text())
    run = tmp_path / "run"
    extra = {"method.name": "fastclip", "train.max_steps": 3, "train.global_batch_size": 8}
    cfg = tiny_config(run, info["shards"], **extra)
    # the defaults come from beside the shards: num_samples from sizes.json, data_size from dataset.yaml
    assert (cfg["data"]["train_num_samples"], cfg["data"]["data_size"]) == (info["num_samples"], info["data_size"])
    train(cfg)
    assert (run / "done.json").exists()
    assert cli(["error", "run", str(run), "--anchors", "8"]) == 0
    row = json.loads((run / "error" / "error.json").read_text())
    assert row["n"] == GOOD and row["step"] == 3


def test_same_layout_as_the_synthetic_generator(tsv_download, tmp_path):
    """Member names, .json keys and fields, sidecars and dataset.yaml's data_size of synthetic shards and of
    img2dataset's shards of the same number of rows and shard size: the same, but for img2dataset's failed rows,
    which are absent from its tars (their keys stay unused)."""
    from neuclip.data.synth import ATTRIBUTES, synthesize

    out, rows = tsv_download["out"], tsv_download["rows"]
    synth = tmp_path / "synth"
    synthesize(synth, num_train=len(rows), num_eval=2, seed=0, shard_size=PER_SHARD)
    synth = synth / "train"

    def layout(folder: Path, shard: str):
        names = _members(folder / f"{shard}.tar")
        exts = {tuple(sorted(n.split(".", 1)[1] for n in names if n.startswith(k + "."))) for k in
                {n.split(".")[0] for n in names}}  # fmt: skip
        with tarfile.open(folder / f"{shard}.tar") as tf:
            meta = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
        sidecars = sorted(p.name.replace(shard, "N") for p in folder.glob(f"{shard}*") if p.suffix != ".tar")
        stats = json.loads((folder / f"{shard}_stats.json").read_text())
        return names, exts, meta, sidecars, set(stats), stats["successes"], len(names) // 3

    for shard in ("00000", "00001", "00002"):
        s_names, s_exts, s_meta, s_side, s_stats, s_ok, s_n = layout(synth, shard)
        i_names, i_exts, i_meta, i_side, i_stats, i_ok, i_n = layout(out, shard)
        assert s_exts == i_exts == {("jpg", "json", "txt")}
        assert {tuple(m) for m in s_meta} == {tuple(ATTRIBUTES) + tuple(next(iter(i_meta)))}  # img2dataset's order
        assert s_side == i_side == ["N.parquet", "N_stats.json"] and s_stats == i_stats
        assert (s_ok, i_ok) == (s_n, i_n)  # stats count what the tar holds
        for m in s_meta + i_meta:
            assert m["status"] == "success" and m["error_message"] is None and m["key"].isdigit()
        # the keys: row r of shard k is img2dataset's key in both; img2dataset's failed rows are missing
        k = int(shard)
        failed = {keys.img2dataset_key(k, r, PER_SHARD) for r in range(PER_SHARD)
                  if "/img/" not in rows[k * PER_SHARD + r]["url"]}  # fmt: skip
        assert [m["key"] for m in s_meta] == [keys.img2dataset_key(k, r, PER_SHARD) for r in range(PER_SHARD)]
        assert sorted(m["key"] for m in i_meta) == sorted(set(m["key"] for m in s_meta) - failed)
        assert sorted(i_names) == sorted(n for n in s_names if n.split(".")[0] not in failed)
    # parquet sidecars: the same columns (img2dataset's, after the synthetic scene columns)
    import pyarrow.parquet as pq

    s_cols, i_cols = pq.read_schema(synth / "00000.parquet").names, pq.read_schema(out / "00000.parquet").names
    assert s_cols == list(ATTRIBUTES) + i_cols
    # dataset.yaml: the same data_size (max key + 1) and key scheme
    s_info, i_info = (yaml.safe_load((d / "dataset.yaml").read_text()) for d in (synth, out))
    assert s_info["data_size"] == i_info["data_size"] == 28 and s_info["key_scheme"] == i_info["key_scheme"]
    assert s_info["num_samples"] == len(rows) and i_info["num_samples"] == GOOD


def test_rerun_resumes_instead_of_redoing(tsv_download, tmp_path):
    """A second run keeps finished shards (img2dataset's incremental mode); a shard without its stats file is
    redone; a rerun with another layout option is refused."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tsv_download["out"], out)
    (out / "00001_stats.json").unlink()  # as if the run had died while writing shard 1
    (out / "00001.tar").write_bytes(b"half a tar")
    kept = (out / "00000.tar").stat().st_mtime_ns
    with Server(_routes(tsv_download["images"])) as server:
        url_list = tmp_path / "urls.tsv"  # same rows; only the port differs (another server)
        text = tsv_download["url_list"].read_text()
        old = tsv_download["rows"][0]["url"].split("/img/")[0]
        url_list.write_text(text.replace(old, server.url("")))
        # the bytes differ (the port), so the folder's list check asks for --other-list: said knowingly here
        assert cli(["data", "download", "cc3m", "--url-list", str(url_list), "--out", str(out), *SETTINGS,
                    "--other-list"]) == 0
        assert set(server.hits) <= {f"/img/{i}.jpg" for i in range(GOOD)} | set(BAD)
        assert len(server.hits) <= PER_SHARD  # only shard 1's rows were fetched again
    assert (out / "00000.tar").stat().st_mtime_ns == kept
    assert cli(["data", "check", str(out)]) == 0

    with pytest.raises(dl.DownloadError, match="number_sample_per_shard: 8 then, 4 now"):
        dl.download("cc3m", url_list, out, dl.parse_sets(["number_sample_per_shard=4"]))


def test_parquet_input_keeps_uid(tmp_path):
    """DataComp-style parquet (url, text, uid, face_bboxes) through the datacomp recipe: uid in every .json and
    in the parquet sidecar, DataComp's 8-digit shard names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = _synthetic_images(tmp_path / "synth", 6)
    with Server(_routes(images)) as server:
        rows = _rows(server, images)[:8]  # 6 good, /missing.jpg and /slow.jpg
        for i, r in enumerate(rows):
            r.update(text=r.pop("caption"), uid=f"{i:032x}", face_bboxes=[])
        table = pa.Table.from_pylist(rows, schema=pa.schema([("url", pa.string()), ("text", pa.string()),
                                     ("uid", pa.string()), ("face_bboxes", pa.list_(pa.list_(pa.float64())))]))
        pq.write_table(table, tmp_path / "part0.parquet")  # fmt: skip
        out = tmp_path / "out"
        settings = [s for s in SETTINGS if "per_shard" not in s] + ["--set=number_sample_per_shard=4"]
        status = cli(["data", "download", "datacomp_small", "--url-list", str(tmp_path / "part0.parquet"),
                      "--out", str(out), *settings])  # fmt: skip
        assert status == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000000.tar", "00000001.tar"]
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    assert info["num_samples"] == 6 and info["data_size"] == 14 and len(info["failures"]) == 2
    uids = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(tf.extractfile(m))
                    uids[meta["key"]] = meta["uid"]
    by_url = {r["url"]: r["uid"] for r in rows}
    sidecar = pq.read_table(out / "00000001.parquet").to_pylist()
    assert {r["uid"] for r in sidecar} == {by_url[r["url"]] for r in sidecar}  # failed rows listed, with uid
    assert len(uids) == 6 and set(uids.values()) <= set(by_url.values())
    assert cli(["data", "check", str(out)]) == 0


def test_offline_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(dl.DownloadError, match="no download recipe for 'nope'"):
        dl.options("nope", tmp_path, tmp_path)
    with pytest.raises(dl.DownloadError, match="expected KEY=VALUE"):
        dl.parse_sets(["processes_count"])
    monkeypatch.setenv("NEUCLIP_IMG2DATASET", str(tmp_path / "no-python"))
    with pytest.raises(dl.DownloadError, match="make img2dataset"):
        dl.img2dataset_python()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.json").write_text("{}")
    (tmp_path / "u.tsv").write_text("caption\turl\n")
    monkeypatch.delenv("NEUCLIP_IMG2DATASET")
    with pytest.raises(dl.DownloadError, match="notes.json: img2dataset's resume parses"):
        dl.download("cc3m", tmp_path / "u.tsv", tmp_path / "out")


def test_key_scheme_matches_img2dataset_defaults():
    assert keys.img2dataset_key(0, 0, 10000, 5) == "000000000"
    assert keys.img2dataset_key(331, 8332, 10000, 5) == "003318332"  # CC3M's last row -> data_size 3,318,333
    assert keys.img2dataset_key(3, 7, 1024, 5) == "000030007"
    assert dl.key_space([dl.ShardStats(331, "00331.tar", 8333, 8000, 333, 0)], 10000) == 3318333


def test_a_rerun_with_another_url_list_is_refused_before_img2dataset(tmp_path):
    """A folder resumes from the list it started with (another would mix two lists' rows under one key scheme
    while dataset.yaml said every row of the first was done); --other-list adds the rows knowingly."""
    first, second, out = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "out"
    first.write_text("caption\turl\ncat\thttp://127.0.0.1:9/a.jpg\n")
    second.write_text("caption\turl\ndog\thttp://127.0.0.1:9/b.jpg\n")
    out.mkdir()
    (out / dl.INPUT).write_text(f"{dl.input_digest(first, 'tsv')}  {first}\n")  # as a first run leaves it
    with pytest.raises(dl.DownloadError, match=r"was downloaded from another URL list .* --other-list"):
        dl.download("cc3m", second, out)
    assert (out / dl.INPUT).read_text().startswith(dl.input_digest(first, "tsv"))  # the record is kept


def test_a_url_list_without_its_header_is_named_before_img2dataset(tmp_path):
    urls = tmp_path / "u.tsv"
    urls.write_text("a cat\thttp://127.0.0.1:9/a.jpg\n")  # no 'caption<TAB>url' line
    with pytest.raises(dl.DownloadError, match=r"u.tsv: no column 'url', 'caption' in its header"):
        dl.download("cc3m", urls, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_cells_stay_one_line():
    stats = [dl.ShardStats(0, "00000.tar", 3, 1, 2, 0, {"Exceeded 30 redirects.\nHistory: a | b": 2})]
    table = dl.report_table(stats)
    row = next(line for line in table.splitlines() if line.startswith("| 00000.tar"))
    assert "Exceeded 30 redirects. History: a \\| b ×2" in row
    assert all(line.count("|") - line.count("\\|") in (7, 3) for line in table.splitlines() if line.startswith("|"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_download_stops_img2datasets_whole_process_group(tmp_path, sig):
    """A stand-in for img2dataset (NEUCLIP_IMG2DATASET) starts a worker and waits; interrupting `neuclip data
    download` must stop the worker too (img2dataset's workers went on writing a shard after SIGINT)."""
    worker_pid = tmp_path / "worker.pid"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/bash\nsleep 300 &\necho $! > {worker_pid}\necho img2dataset 0.0\nwait\n")
    fake.chmod(0o755)
    urls = tmp_path / "u.tsv"
    urls.write_text("caption\turl\ncat\thttp://127.0.0.1:9/a.jpg\n")
    env = {**os.environ, "NEUCLIP_IMG2DATASET": str(fake)}
    proc = subprocess.Popen([sys.executable, "-m", "neuclip.cli", "data", "download", "cc3m", "--url-list", str(urls),
                             "--out", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (worker_pid.exists() and worker_pid.read_text().strip()):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    pid = int(worker_pid.read_text())
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    deadline = time.time() + 30
    while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        assert time.time() < deadline, f"img2dataset's worker {pid} outlived the interrupted download"
        time.sleep(0.1)


def test_non_ascii_urls_are_percent_encoded_as_a_browser_sends_them(tmp_path):
    """img2dataset was handed 'http://h/café.jpg' as it stood and lost the image; the copy it now reads has the
    URL as a browser sends it, in the same rows (so the same keys), and ASCII lists are left alone."""
    urls = tmp_path / "u.tsv"
    urls.write_text("caption\turl\na cat\thttp://127.0.0.1:9/café.jpg\na dog\thttp://127.0.0.1:9/dog.jpg?x=1&y=2\n",
                    encoding="utf-8")
    opts = dl.options("cc3m", urls, tmp_path / "out")
    (tmp_path / "out").mkdir()
    copy = dl.ascii_urls(urls, opts, tmp_path / "out")
    assert copy.read_text().splitlines() == ["caption\turl", "a cat\thttp://127.0.0.1:9/caf%C3%A9.jpg",
                                             "a dog\thttp://127.0.0.1:9/dog.jpg?x=1&y=2"]
    plain = tmp_path / "plain.tsv"
    plain.write_text("caption\turl\na dog\thttp://127.0.0.1:9/dog.jpg\n")
    assert dl.ascii_urls(plain, opts, tmp_path / "out") is None
    assert dl.browser_url("http://h/a b/é?q=ü#frag") == "http://h/a%20b/%C3%A9?q=%C3%BC#frag"
