"""`neuclip data fetch-eval SUITE --root DIR`: the evaluation sets a suite needs, fetched as DataComp does.

DataComp's download_evalsets.py gets each clip_benchmark `wds/` set from the Hugging Face dataset repo
`djghosh/wds_<task>_test` into `DIR/wds_<task>_test/` (classnames, templates, test/nshards.txt, test/N.tar,
re-downloading a tar whose size or sha256 differs), and the three `nlphuji/...` retrieval sets with
`datasets.load_dataset(..., split="test", cache_dir=DIR/hf_cache)`. We do the same with huggingface_hub's
`snapshot_download(local_dir=...)`, which resumes partial files and re-fetches any whose etag (the LFS sha256)
differs from the Hub's. Folder names and the "is it there" test are eval/suites.py's and eval/data.py's
`check_task`, the ones `neuclip eval` applies, so a set this reports present is one eval accepts.

Offline: the Hub is probed once (`--timeout` seconds) before anything is fetched; unreachable means a clear
error naming what is missing and where to get it, in about `--timeout` seconds at most, not a hang per file.
HF_HUB_OFFLINE=1 skips the probe and only reports.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from neuclip.eval.suites import Task, suite_tasks

WDS_FILES = ["*.txt", "test/*"]  # classnames, templates, dataset_type; the test split (tars, nshards, .npy)


class FetchError(RuntimeError):
    pass


def hub_repo(task: Task) -> str:
    return f"djghosh/{task.folder}"  # download_evalsets.py: huggingface.co/datasets/djghosh/<dir_name>


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def probe(url: str, timeout: float) -> str | None:
    """None if `url` answers at all (any HTTP status), else why not."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
    return None


def survey(suite: str, root: Path):
    """([present tasks], [Missing]) by eval's own check."""
    from neuclip.eval.data import check_task

    present, missing = [], []
    for task in suite_tasks(suite):
        found = check_task(task, root)
        (missing if found else present).append(found or task)
    return present, missing


def fetch_task(task: Task, root: Path, timeout: float) -> None:
    if task.source == "hf":
        try:
            import datasets
        except ImportError:
            raise FetchError("needs the `datasets` package (pip install datasets), as DataComp's script") from None
        datasets.load_dataset(task.dataset, split="test", cache_dir=str(root / "hf_cache"))
        return
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo_id=hub_repo(task), repo_type="dataset", local_dir=root / task.folder, allow_patterns=WDS_FILES,
        etag_timeout=timeout,
    )  # fmt: skip


def fetch_eval(suite: str, root, timeout: float = 10.0, echo=print) -> int:
    """Fetch what `suite` lacks under `root`; 0 when everything is present afterwards."""
    root = Path(root)
    present, missing = survey(suite, root)
    echo(f"suite {suite!r} under {root}: {len(present)} of {len(present) + len(missing)} data sets present")
    for task in present:
        echo(f"  present  {task.id:<18} {root / (task.folder if task.source == 'wds' else 'hf_cache')}")
    if not missing:
        return 0
    synthetic = [m for m in missing if m.task.id.startswith("synth_")]
    if synthetic:
        ids = ", ".join(m.task.id for m in synthetic)
        raise FetchError(f"{ids}: generated, not fetched: neuclip data synth {root}")
    names = ", ".join(m.task.id for m in missing)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FetchError(f"HF_HUB_OFFLINE is set and {len(missing)} set(s) are missing: {names}")
    hub = endpoint()
    why = probe(f"{hub}/api/datasets/{hub_repo(missing[0].task)}", timeout)
    if why is not None:
        raise FetchError(
            f"cannot reach the Hugging Face Hub at {hub} ({why}; probe timeout {timeout:g} s); {len(missing)} set(s) "
            f"missing: {names}. Run this where there is network and copy {root} here, or set HF_ENDPOINT to a "
            "mirror."
        )
    failed = {}
    for m in missing:
        echo(f"  fetching {m.task.id:<18} ({hub_repo(m.task) if m.task.source == 'wds' else m.task.dataset})")
        try:
            fetch_task(m.task, root, timeout)
        except Exception as err:  # keep going with the others, as DataComp's script does; reported below
            failed[m.task.id] = f"{type(err).__name__}: {err}"
    _, still = survey(suite, root)
    for m in still:
        failed.setdefault(m.task.id, f"{m.path} {m.problem} after fetching")
    if failed:
        lines = "\n  ".join(f"{task}: {why}" for task, why in failed.items())
        raise FetchError(f"{len(failed)} set(s) not fetched (run again to resume):\n  {lines}")
    echo(f"all {len(present) + len(missing)} data sets of {suite!r} present")
    return 0
