"""The experiment grid: schema validation, the paper grid's dry run, and the train configs it builds."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

import neuclip.grid.workflow as wf

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "workflows" / "configs"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def load(name):
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["tiny", "paper", "ablations", "error_study"])
def test_shipped_configs_validate(name):
    wf.validate_config(load(name))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"foo": 1}, r"unknown config key\(s\) \['foo'\]; allowed keys: .*datasets"),
        ({"methods": ["neuclp"]}, r"'neuclp' is not one of \['openclip'"),
        ({"datasets": ["cc4m"]}, r"'cc4m' is not one of \['cc3m', 'cc12m'"),
        ({"seeds": ["one"]}, r"'one' is not of type 'integer'.*seeds"),
        ({"launcher": "pbs"}, r"'pbs' is not one of \['inprocess', 'local', 'debug', 'slurm'\]"),
    ],
)
def test_bad_configs_name_the_key_and_allowed_values(change, message):
    cfg = {**load("tiny"), **change}
    with pytest.raises(Exception, match=re.compile(message, re.S)):
        wf.validate_config(cfg)


def test_schema_enums_come_from_the_registries():
    from neuclip.estimators.registry import method_names

    schema = wf.schema()["definitions"]
    assert schema["method"]["enum"] == method_names()
    assert schema["dataset"]["enum"] == list(wf.registry({}))
    static = yaml.safe_load(wf.SCHEMA.read_text())["definitions"]
    assert static["method"]["enum"] == [] and static["dataset"]["enum"] == []  # no second list to keep in step


@pytest.mark.slow  # snakemake process
def test_paper_grid_dry_run_lists_the_expected_jobs():
    out = subprocess.run(
        [*SNAKEMAKE, "-n", "all", "--configfile", str(CONFIGS / "paper.yaml"), "--quiet", "rules"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts = {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", out, re.M)}
    # 3 seeds on cc3m, cc12m, dfn14m and 1 on dfn192m, dfn1b, laion315m: 12 x 7 methods = 84 runs, each
    # evaluated on datacomp38, imagenet_variants and retrieval.
    assert counts == {
        "data_check": 6,
        "train_config": 84,
        "train": 84,
        "evaluate": 252,
        "report": 1,
        "all": 1,
        "total": 428,
    }


def test_paper_runs_and_their_configs():
    cfg = load("paper")
    wf.validate_config(cfg)
    runs = wf.runs(cfg)
    per = Counter((r.dataset, r.seed) for r in runs)
    assert per[("cc3m", 2)] == 7 and per[("dfn1b", 0)] == 7 and ("dfn1b", 1) not in per
    run = wf.Run("cc3m", "fastclip", "default", 1)
    tc = wf.train_config(cfg, run)
    assert tc["run_dir"] == "runs/paper/cc3m/fastclip/default/seed1"
    assert tc["model"] == "RN50"
    assert tc["train"]["global_batch_size"] == 1024 and tc["train"]["betas"] == [0.9, 0.999]
    assert tc["data"]["train_shards"] == "/data/webdataset/cc3m/{00000..00331}.tar"
    assert tc["data"]["data_size"] == 3318333
    assert tc["method"]["common_options"]["rho"] == 6.5 and tc["method"]["common_options"]["gamma_decay_epochs"] == 18
    assert tc["launcher"]["nodes"] == 1 and tc["launcher"]["gpus_per_node"] == 4
    assert tc["error"] == {"every": 10000, "anchors": 4096, "batch_size": 512}  # tracked on CC3M only
    assert wf.train_config(cfg, wf.Run("cc12m", "fastclip", "default", 0))["error"]["every"] == 0
    assert tc["meta"] == {
        "experiment": "paper",
        "dataset": "cc3m",
        "method": "fastclip",
        "variant": "default",
        "seed": 1,
        "scale": "paper",
    }
    neu = wf.train_config(cfg, wf.Run("dfn1b", "neuclip", "default", 0))
    assert neu["train"]["max_steps"] == 195313 and neu["method"]["options"]["num_prototypes"] == 4096


def test_ablation_variants_override_neuclip_options():
    cfg = load("ablations")
    wf.validate_config(cfg)
    variants = {r.variant for r in wf.ablation_runs(cfg)}
    assert {"T_u=1", "T_r=inf", "objective=separate", "npn=mlp", "updates=simultaneous"} <= variants
    tc = wf.train_config(cfg, wf.Run("dfn14m", "neuclip", "T_r=inf", 0))
    assert tc["method"]["options"]["restart_every"] == 0 and tc["method"]["options"]["inner_steps"] == 10


def test_site_overrides_replace_registry_fields():
    cfg = copy.deepcopy(load("paper"))
    cfg["dataset_overrides"] = {"cc3m": {"shards": "/scratch/cc3m/{000..099}.tar", "data_size": 3400000}}
    tc = wf.train_config(cfg, wf.Run("cc3m", "openclip", "default", 0))
    assert tc["data"]["train_shards"] == "/scratch/cc3m/{000..099}.tar" and tc["data"]["data_size"] == 3400000
    cfg["dataset_overrides"] = {"cc4m": {}}
    with pytest.raises(KeyError, match="unknown data set 'cc4m'"):
        wf.registry(cfg)


def test_synthetic_data_size_is_what_the_generator_writes(tmp_path):
    """One source: the train config's data_size for the generated set, known before the data exists (the
    preflight needs it), equals the data_size `neuclip data synth` writes to dataset.yaml for those sizes;
    a rehearsal's ratio-based data_size applies only where it is larger."""
    from neuclip.data.keys import read_info
    from neuclip.data.synth import synthesize

    cfg = copy.deepcopy(load("tiny"))
    cfg["synthetic"] = {**cfg["synthetic"], "num_train": 40, "shard_size": 16}
    run = wf.Run("synthetic", "fastclip", "default", 0)
    tc = wf.train_config(cfg, run)
    synthesize(tmp_path / "s", num_train=40, num_eval=2, seed=0, shard_size=16)
    assert tc["data"]["data_size"] == read_info(tmp_path / "s" / "train")["data_size"] == 208  # keys 200..207
    assert tc["data"]["train_num_samples"] == 40
    cfg["dataset_overrides"] = {"synthetic": {"data_size": 500}}
    assert wf.train_config(cfg, run)["data"]["data_size"] == 500
    cfg["dataset_overrides"] = {"synthetic": {"data_size": 50}}
    assert wf.train_config(cfg, run)["data"]["data_size"] == 208


def test_the_config_file_holds_the_identity_and_settings_travel_one_channel():
    """The train_config rule writes no run setting (mem_gb, workers, intervals): those reach `neuclip train` only
    as the train rule's overrides, and file + overrides is the cell's whole train config."""
    from neuclip.train.config import DEFAULTS, IDENTITY_KEYS, _merge, get, parse_overrides

    cfg = load("paper")
    run = wf.Run("cc3m", "neuclip", "default", 0)
    written = wf.config_file(cfg, run)
    assert "launcher" not in written and "workers" not in written["data"]
    assert "checkpoint_every" not in written["train"] and "every" not in written.get("error", {})
    full = _merge(copy.deepcopy(DEFAULTS), wf.train_config(cfg, run))
    from_file = _merge(copy.deepcopy(DEFAULTS), written)
    assert {k: get(from_file, k) for k in IDENTITY_KEYS} == {k: get(full, k) for k in IDENTITY_KEYS}
    overrides = parse_overrides(shlex.split(str(wf.train_settings(cfg, run))))
    assert _merge(from_file, overrides) == full
    assert full["launcher"]["mem_gb"] == 240  # the paper grid's resources, through the one channel
