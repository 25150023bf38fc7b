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
