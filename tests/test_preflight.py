"""The preflight: every cell of the shipped grids passes under the SLURM launcher, and each check, broken once,
fails naming the cell and the key (neuclip/grid/preflight.py)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import neuclip.grid.workflow as wf
from neuclip.grid.preflight import PreflightError, preflight

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "workflows" / "configs"


def slurm(name: str, **changes) -> dict:
    """An experiment as `--profile slurm` runs it (the profile sets launcher and slurm_site)."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config = wf.deep_merge(config, {"launcher": "slurm", "slurm_site": "slurm/site.yaml", **changes})
    wf.validate_config(config)
    return config


@pytest.mark.parametrize("name", ["paper", "ablations", "datacomp"])
def test_shipped_grids_pass_the_preflight_under_slurm(name):
    plans = preflight(slurm(name))
    assert len(plans) == len(wf.runs(slurm(name)))
    worlds = {p.cell.split("/")[0]: p.world for p in plans}
    if name == "paper":  # 2 nodes x 4 GPUs, but CC3M and CC12M on 1 node x 4 (paper.yaml)
        assert worlds == {"cc3m": 4, "cc12m": 4, "dfn14m": 8, "dfn192m": 8, "dfn1b": 8, "laion315m": 8}
    if name == "datacomp":  # 8 GPUs a node; 1, 1, 4 and 32 nodes; per-sample state sharded over them
        assert worlds == {"datacomp_small": 8, "datacomp_medium": 8, "datacomp_large": 32, "datacomp_xlarge": 256}
        xlarge = next(p for p in plans if p.cell == "datacomp_xlarge/isogclr/default/seed0")
        assert xlarge.state_gib_per_rank == pytest.approx(40 * 12.8e9 / 256 / 2**30, rel=1e-6)


@pytest.mark.slow  # snakemake process
def test_snakemake_dry_run_with_the_slurm_profile_passes_the_preflight():
    # no cluster answers here (the test cluster's SLURM_CONF left out): the grid's own checks only; the
    # requests against a cluster's nodes are test_stage_requests_are_checked_against_the_cluster_nodes
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--profile", "slurm", "all", "--configfile",
         str(CONFIGS / "paper.yaml"), "--quiet", "rules"],
        cwd=REPO, capture_output=True, text=True, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]


# `sinfo -h -N -o '%P|%c|%m|%G'` of a cluster: the test cluster's default partition (2 CPUs, 2 fake GPUs) and
# a partition of two 8-GPU nodes
SINFO = """debug*|2|23081|gpu:fake:2
big|64|512000|gpu:a100:8(S:0-1)
big|64|512000|gpu:a100:8(S:0-1)
odd|N/A|100|(null)
"""


def test_stage_requests_are_checked_against_the_cluster_nodes():
    from neuclip.grid.cluster_fit import parse_sinfo

    cluster = parse_sinfo(SINFO)
    assert cluster[1] == "debug" and [n.gpus for n in cluster[0]["big"]] == [8, 8] and "odd" not in cluster[0]
    tiny = slurm("tiny")
    assert preflight(tiny, cluster=cluster)  # the tiny pipeline fits the test cluster's node
    # the error sweep asks for more CPUs than a node has (seen: it pended for ever with reason PartitionConfig)
    with pytest.raises(PreflightError) as err:
        preflight(wf.deep_merge(tiny, {"stages": {"error_sweep": {"cpus_per_task": 4}}}), cluster=cluster)
    assert "stage error_sweep" in str(err.value) and "4 CPU(s)" in str(err.value) and "'debug'" in str(err.value)
    # the paper grid's 4 GPUs a node against 2-GPU nodes: every training stage named, with the key
    with pytest.raises(PreflightError) as err:
        preflight(slurm("paper"), cluster=cluster)
    assert "stage train" in str(err.value) and "gpus_per_node" in str(err.value) and "cc3m" in str(err.value)
    # on the 8-GPU partition it fits; 4 nodes of it do not exist
    assert preflight(slurm("paper", resources={"partition": "big"}), cluster=cluster)
    assert preflight(slurm("paper", resources={"partition": "debug,big"}), cluster=cluster)  # a list: any one
    with pytest.raises(PreflightError, match="asks for 4 nodes"):
        preflight(slurm("paper", resources={"partition": "big"}, per_dataset={"dfn1b": {"resources": {"nodes": 4}}}),
                  cluster=cluster)
    with pytest.raises(PreflightError, match="partition 'nope' is not one of"):
        preflight(slurm("tiny", resources={"partition": "nope"}), cluster=cluster)
    assert preflight(slurm("tiny", stages={"error_sweep": {"cpus_per_task": 4}}), cluster=None)  # no cluster: no check


def failure(config: dict) -> str:
    with pytest.raises(PreflightError) as err:
        preflight(config)
    return str(err.value)


def test_a_batch_the_world_does_not_divide_names_the_cell_and_key():
    config = slurm("paper", per_dataset={"cc3m": {"resources": {"gpus_per_node": 3}}})
    message = failure(config)
    assert "cell paper/cc3m/openclip/default/seed0" in message and "train.global_batch_size (1024)" in message
    assert "cc12m" not in message  # only the broken data set's cells


def test_isogclr_state_beyond_mem_gb_at_dfn1b_names_the_cell_and_key():
    config = slurm("paper", per_dataset={"dfn1b": {"resources": {"mem_gb": 100}}})
    message = failure(config)
    assert "cell paper/dfn1b/isogclr/default/seed0" in message and "launcher.mem_gb (100)" in message
    assert "raise resources.mem_gb" in message
    assert "dfn1b/fastclip" not in message  # 4 ranks x 11 GB of FastCLIP state fit in 100 GB


@pytest.mark.parametrize(
    "change,key",
    [
        ({"method_options": {"neuclip": {"num_protoypes": 64}}}, "unknown option(s) ['num_protoypes']"),
        ({"method_options": {"neuclip": {"inner_steps": 0}}}, "method.options.inner_steps"),
        ({"common_options": {"rhoo": 1.0}}, "['rhoo'] is not a shared option"),
        ({"train": {"log_every": "often"}}, "config key 'train.log_every'"),
        ({"model": "ViT-Q-99"}, "model 'ViT-Q-99'"),
    ],
)
def test_each_broken_setting_names_the_cell_and_key(change, key):
    config = copy.deepcopy(slurm("paper"))
    config = wf.deep_merge(config, change)
    for ds in config["per_dataset"].values():  # per-data-set models would hide a top-level model change
        if "model" in change:
            ds.pop("model", None)
    message = failure(config)
    assert key in message and "cell paper/" in message, message


def test_sharded_state_is_counted_per_rank():
    """state_placement: sharded holds 1/world of the per-sample state on each rank (neuclip/estimators/sharding.py):
    the DFN-1B iSogCLR cell that replicated state puts over mem_gb 100 then fits, at 1/8 of the figure."""
    replicated = {p.cell: p for p in preflight(slurm("paper", datasets=["dfn1b"]))}
    config = slurm("paper", datasets=["dfn1b"], per_dataset={"dfn1b": {"resources": {"mem_gb": 100}}},
                   common_options={"state_placement": "sharded"})
    sharded = {p.cell: p for p in preflight(config)}
    for method in ("sogclr", "isogclr", "fastclip"):
        cell = f"dfn1b/{method}/default/seed0"
        whole = replicated[cell].state_gib_per_rank
        assert sharded[cell].world == 8 and sharded[cell].state_gib_total == pytest.approx(whole)
        assert sharded[cell].state_gib_per_rank == pytest.approx(whole / 8, rel=1e-6)
    # 40 bytes per id (a, tau, Adam m, v for two modalities in float32, int64 visits) x 1.4e9 ids / 8 ranks
    assert sharded["dfn1b/isogclr/default/seed0"].state_gib_per_rank == pytest.approx(40 * 1.4e9 / 8 / 2**30, rel=1e-6)
    message = failure(slurm("paper", datasets=["dfn1b"], per_dataset={"dfn1b": {"resources": {"mem_gb": 20}}},
                            common_options={"state_placement": "sharded"}))
    assert "cell paper/dfn1b/isogclr/default/seed0" in message and "(sharded)" in message  # 4 x 6.5 GiB > 20
    assert "dfn1b/fastclip" not in message  # 4 x 1.3 GiB


def test_datacomp_xlarge_needs_the_sharded_state():
    """Replicated, iSogCLR's 512 GB of state per rank at xlarge (12.8e9 ids) fits no node: named, with the fix."""
    message = failure(slurm("datacomp", datasets=["datacomp_xlarge"], common_options={"state_placement": "replicated"}))
    assert "cell datacomp/datacomp_xlarge/isogclr/default/seed0" in message and "launcher.mem_gb (480)" in message
    assert "state_placement: sharded" in message


def test_a_data_set_without_data_size_takes_it_from_dataset_yaml_beside_its_shards(tmp_path):
    """As the trainer does (neuclip/data/keys.py): the dataset.yaml that `neuclip data download` writes; with
    none here, num_samples is used as a lower bound, with a warning naming the key to set."""
    shards = tmp_path / "cc3m"
    shards.mkdir()
    config = slurm("paper", datasets=["cc3m"], dataset_overrides={"cc3m": {"data_size": None,
                   "shards": str(shards / "{00000..00331}.tar")}})  # fmt: skip
    plans = preflight(config)
    assert {p.cfg["data"]["data_size"] for p in plans} == {2723840}  # num_samples
    assert any("has no data_size" in w and "set data_size" in w for p in plans for w in p.warnings)
    (shards / "dataset.yaml").write_text("num_samples: 2723840\ndata_size: 3318333\n")
    plans = preflight(config)
    assert {p.cfg["data"]["data_size"] for p in plans} == {3318333}
    assert not any("has no data_size" in w for p in plans for w in p.warnings)
