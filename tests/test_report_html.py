"""`snakemake --report report.html` embeds every table and plot, in four categories with captions, and the page
shows them in headless Chromium (Debian's package, driven over the DevTools protocol).

The report rule is workflows/report.smk itself, included by a two-line Snakefile that points it at a copy of
the report fixtures (tests/fixtures/report/runs/tiny), so no training runs. Set NEUCLIP_SCREENSHOTS=DIR to
keep the screenshots.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "report" / "runs"
CATEGORIES = {"Main tables", "Error study", "Training curves", "Per run"}


def _snakemake(cwd: Path, *args: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(FIXTURES / "tiny", root / "runs" / "tiny")
    (root / "Snakefile").write_text(
        'EXP_RUNS = "runs/tiny"\nEXP_RESULTS = "results/tiny"\n'
        "def all_eval_summaries():\n    return []\n"
        "def error_study_outputs():\n    return []\n"
        f"include: {str(REPO / 'workflows' / 'report.smk')!r}\n"
    )
    _snakemake(root, "-c1", "report")
    _snakemake(root, "--report", "report.html", "report")
    text = (root / "report.html").read_text()
    results = json.loads(re.search(r"var results = (\{.*?\});\n", text, re.S).group(1))
    categories = json.loads(re.search(r"var categories = (\{.*?\});\n", text, re.S).group(1))
    return root, results, categories


def _payload(entry: dict) -> bytes:
    head, data = entry["data_uri"].split(",", 1)
    assert head.endswith(";base64"), head
    return base64.b64decode(data)


def test_every_table_and_plot_is_embedded_in_its_category(built):
    from PIL import Image

    root, results, categories = built
    assert set(categories) == CATEGORIES
    where = {Path(path).name: cat for cat, subs in categories.items() for paths in subs.values() for path in paths}
    made = root / "results" / "tiny"
    for png in (made / "plots").glob("*.png"):  # every plot neuclip report drew ...
        assert png.name in where, png.name
    for md in (made / "tables").glob("*.md"):  # ... and every table
        assert f"{md.stem}.html" in where, md.name
    assert where["main.html"] == "Main tables" and where["error_vs_ratio.png"] == "Error study"
    assert where["training_synthetic_tiny.png"] == "Training curves" and where["runs.html"] == "Per run"
    assert where["error_training_synthetic_tiny.png"] == "Error study"

    images = 0
    for path, entry in results.items():
        data = _payload(entry)
        if entry["mime_type"] == "image/png":
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # decodes every pixel
                assert im.width > 100 and im.height > 100
            assert data == (made / "plots" / Path(path).name).read_bytes()
            images += 1
        elif entry["mime_type"] == "text/html":
            page = data.decode()
            assert "<h3>" in page or "<h1>" in page or "<h2>" in page, path
            assert "<table>" in page or Path(path).stem == "missing", path  # missing.md is a list
            if Path(path).stem == "main":  # the fixtures' hand-picked numbers (make_fixtures.py)
                assert "DataComp-38 average" in page and ">48.00 ± 1.41 (n=2)</td>" in page
        assert entry["caption"].strip(), f"{path} has no caption"
    assert images == len(list((made / "plots").glob("*.png")))
    caption = {Path(p).name: e["caption"] for p, e in results.items()}
    assert "Normaliser error against n/B" in caption["error_vs_ratio.png"]
    assert "own normaliser error during training" in caption["error_training_synthetic_tiny.png"]
    assert "Table <tt" in caption["main.html"] and "standard deviation over seeds" in caption["main.html"]
    assert "expects but that has no result yet" in caption["missing.html"]


class Chromium:
    """Headless Chromium with a DevTools websocket: evaluate JavaScript, take screenshots."""

    def __init__(self, profile: Path):
        import websocket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [shutil.which("chromium"), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "--window-size=1600,1000",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1))
                break
            except OSError:
                assert time.monotonic() < deadline, "chromium's DevTools endpoint never answered"
                time.sleep(0.2)
        url = next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"]
        self.ws, self.n = websocket.create_connection(url, timeout=30, suppress_origin=True), 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression: str):
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in out, out["exceptionDetails"]
        return out["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)
        return value

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=20)


# Clicks the way a reader does: the category in the menu, then the eye button of the result's row.
CLICK_TEXT = ("(t => { const el = [...document.querySelectorAll('#app *')].find(e => e.children.length === 0 "
              "&& e.textContent.trim() === t); if (!el) return false; el.click(); return true; })")  # fmt: skip
SHOW_ROW = ("(t => { const row = [...document.querySelectorAll('#app tr')].find(r => [...r.querySelectorAll('td')]"
            ".some(td => td.textContent.trim() === t)); const b = row && row.querySelector('button, a'); "
            "if (!b) return false; b.click(); return true; })")  # fmt: skip


def test_chromium_shows_the_main_table_and_the_error_plot(built, tmp_path):
    from PIL import Image

    if shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/install_debs.sh installs it")
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/install_debs.sh does it)")
    root, results, _ = built
    uri = {Path(p).name: e["data_uri"] for p, e in results.items()}
    browser = Chromium(tmp_path / "profile")
    shots = {}
    views = [("Main tables", "main (table)", "main.html", "iframe"),
             ("Error study", "error_vs_ratio (plot)", "error_vs_ratio.png", "img")]  # fmt: skip
    ready = "typeof app !== 'undefined' && document.querySelector('#app').innerText.includes('Main tables')"
    plot_decoded = "[...document.querySelectorAll('img')].some(i => i.src.startsWith('data:image/png') && " \
        "i.naturalWidth)"
    # a data: iframe is another origin, so its text is not readable from here: its bytes are checked above
    frame_size = ("(() => { const r = [...document.querySelectorAll('iframe')].pop().getBoundingClientRect(); "
                  "return r.width > 600 && r.height > 300; })()")  # fmt: skip
    try:
        browser.call("Page.enable")
        for category, row, name, tag in views:
            browser.call("Page.navigate", url=(root / "report.html").as_uri())  # a fresh page for each
            browser.wait_for(ready, "the report app")
            browser.wait_for(f"{CLICK_TEXT}({json.dumps(category)})", f"menu entry {category}")
            browser.wait_for(f"{SHOW_ROW}({json.dumps(row)})", f"result row {row}")
            shown = f"[...document.querySelectorAll('{tag}')].map(e => e.src).find(s => s === {json.dumps(uri[name])})"
            assert browser.wait_for(shown, f"{name} displayed") == uri[name]
            if tag == "img":
                browser.wait_for(plot_decoded, "the plot decoded")
            else:
                browser.wait_for(frame_size, "the table's frame laid out")
            time.sleep(0.5)  # let the frame paint
            shots[name] = browser.screenshot()
    finally:
        browser.close()
    keep = os.environ.get("NEUCLIP_SCREENSHOTS")
    for name, png in shots.items():
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            assert im.size == (1600, 1000) or im.width >= 1000
            colours = im.convert("L").getextrema()
            assert colours[1] - colours[0] > 100  # not a blank page
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / f"report_{Path(name).stem}.png").write_bytes(png)
