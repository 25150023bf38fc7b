"""Shared fixtures. Session-scoped data is read-only: copy it (`shutil.copytree`) before corrupting it."""

from __future__ import annotations

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
