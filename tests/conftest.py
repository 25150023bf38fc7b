"""Shared fixtures. Session-scoped data is read-only: copy it (`shutil.copytree`) before corrupting it."""

from __future__ import annotations

import shutil

import pytest

from tests.slurm_support import slurm_cluster, two_nodes  # noqa: F401  (session fixtures for `slurm` tests)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A tiny synthetic data set (48 train samples in 3 shards, 24 per eval set, 32 px); returns its folder.

    Layout as `neuclip.data.synth.synthesize` documents; the manifest is at `synth_data / "manifest.json"`.
    """
    from neuclip.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, num_train=48, num_eval=24, seed=0, shard_size=16)
    return out


@pytest.fixture(scope="session")
def finished_run(synth_data, tmp_path_factory):
    """A finished 12-step tiny-vit run (openclip) of `neuclip train` on synth_data, its checkpoints at steps 4, 8
    and 12 kept; returns its folder. Read-only: copy it (`shutil.copytree`) before changing anything."""
    from neuclip.cli import main
    from neuclip.train.testing import tiny_overrides, train_pattern

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *tiny_overrides(run_dir, train_pattern(synth_data), train__keep_last=3)]) == 0
    return run_dir


# Disk: a passing test's tmp_path is deleted at its teardown (pyproject's tmp_path_retention_policy), so the
# suite holds at most the session and module fixtures plus the test running now. The header says how much room
# there is, and if a test failed for want of it, the summary says that the disk, not the code, is what to fix.
NO_SPACE = "No space left on device"
# `.ci/run` from a fresh clone held at most 2.3 GiB there (2026-12-06, sampled every 20 s; 8.1 GiB when every
# test kept its folder to the end). 3 leaves a margin.
SUITE_PEAK_GIB = 3


def _free_gib(config) -> tuple[str, float]:
    base = config._tmp_path_factory.getbasetemp()
    return str(base.parent), shutil.disk_usage(base).free / 2**30


def pytest_report_header(config):
    where, free = _free_gib(config)
    short = f": less than the {SUITE_PEAK_GIB} GiB the whole suite needs" if free < SUITE_PEAK_GIB else ""
    return f"temporary folders: {where} ({free:.1f} GiB free{short})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    failed = terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
    full = [r.nodeid for r in failed if NO_SPACE in str(r.longrepr)]
    if full:
        where, free = _free_gib(config)
        terminalreporter.write_line(
            f"{len(full)} test(s) failed because the disk under {where} filled ({free:.1f} GiB free now), "
            f"first {full[0]}. The whole suite needs about {SUITE_PEAK_GIB} GiB free there: free some, or "
            "point pytest at a larger disk with --basetemp.",
            red=True,
        )
