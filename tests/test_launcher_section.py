"""The launcher section (neuclip/grid/launcher.py): one table of knobs for every layer, defaults < launcher.site
< the section given, applied by one function; the trainer's config carries the section without parsing it,
and `neuclip train` completes and checks it before a run folder exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neuclip.grid.launcher import DEFAULTS, LAUNCHER, launcher_section, resolve_launcher, world_size
from neuclip.train.config import ConfigError, load_config


@pytest.mark.parametrize(
    "given,named",
    [
        ({"partitionn": "gpu"}, "partitionn"),
        ({"executor": "kubernetes"}, "launcher.executor"),
        ({"timeout_min": 0}, "launcher.timeout_min"),
        ({"nodes": 1.5}, "launcher.nodes"),
        ({"partition": "gpu\nrm -rf ~"}, "launcher.partition"),
        ({"slurm_additional_parameters": {"bad key": 1}}, "launcher.slurm_additional_parameters"),
    ],
)
def test_a_bad_key_or_value_is_named(given, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as err:
        launcher_section(given)
    if named == "partitionn":
        assert "partition," in str(err.value)  # the allowed keys are listed


def test_defaults_then_the_site_then_the_section(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("partition: debug\ngpus_per_node: 2\ntimeout_min: 30\n"
                    "slurm_additional_parameters: {constraint: x}\n")
    la = launcher_section({"site": "site.yaml", "gpus_per_node": 1, "slurm_additional_parameters": {"x": 1}},
                          base=tmp_path)
    assert set(la) == set(LAUNCHER)
    assert (la["partition"], la["gpus_per_node"], la["timeout_min"]) == ("debug", 1, 30)  # the section wins
    assert la["slurm_additional_parameters"] == {"constraint": "x", "x": 1}
    assert la["site"] == str(site) and la["executor"] == DEFAULTS["executor"]
    assert launcher_section(la) == la  # resolving a resolved section changes nothing (the launcher may do it again)
    site.write_text("partition: debug\nnodes: 2\n")  # the job's shape is not a site default
    with pytest.raises(ConfigError, match="nodes"):
        launcher_section({"site": str(site)})
    for old, new in (("time_min: 30", "'timeout_min'"), ("additional_parameters: {}", "'slurm_additional_parameters'")):
        site.write_text(f"partition: debug\n{old}\n")
        with pytest.raises(ConfigError, match=f"is now {new}"):
            launcher_section({"site": str(site)})
    with pytest.raises(ConfigError, match="no such file"):
        launcher_section({"site": str(tmp_path / "absent.yaml")})


def test_world_size_of_each_executor():
    assert world_size(launcher_section({"executor": "inprocess", "nodes": 1, "gpus_per_node": 8})) == 1
    assert world_size(launcher_section({"executor": "slurm", "nodes": 2, "gpus_per_node": 4})) == 8
    assert world_size(launcher_section({"executor": "local", "tasks_per_node": 3})) == 3


def test_a_file_section_and_dotted_overrides_merge_key_by_key(tmp_path):
    """The train config carries the section free-form; an override changes one key and keeps the file's others."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"launcher": {"executor": "slurm", "partition": "gpu", "nodes": 4}}))
    cfg = load_config(path, ["launcher.nodes=2", "launcher.mem_gb=64"])
    assert cfg["launcher"] == {"executor": "slurm", "partition": "gpu", "nodes": 2, "mem_gb": 64}
    assert load_config(path, ["launcher=null"])["launcher"] == {}  # an explicit null empties it
    la = resolve_launcher(cfg)["launcher"]
    assert (la["executor"], la["partition"], la["nodes"], la["mem_gb"]) == ("slurm", "gpu", 2, 64)


def test_neuclip_train_checks_the_section_before_a_run_folder_exists(tmp_path, capsys):
    from neuclip.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", f"run_dir={run_dir}", "data.train_shards=x.tar", "launcher.gpus=1"]) == 2
    err = capsys.readouterr().err
    assert "gpus" in err and "gpus_per_node" in err, err
    assert not Path(run_dir).exists()
