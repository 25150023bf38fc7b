"""Training config: defaults, YAML + dotted overrides, unknown keys named, §8 settings, site defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from neuclip.train.config import ConfigError, identity_diff, load_config, parse_overrides, resolve
from neuclip.train.testing import train_pattern

CONFIGS = Path(__file__).resolve().parents[1] / "neuclip" / "configs"


def test_overrides_are_dotted_and_yaml_parsed():
    assert parse_overrides(
        [
            "train.lr=1e-3",
            "train.betas=[0.9, 0.999]",
            "method.options={rho: 6.5}",
            "data.skip_bad=true",
            "train.grad_clip=null",
        ]
    ) == {
        "train": {"lr": 1e-3, "betas": [0.9, 0.999], "grad_clip": None},
        "method": {"options": {"rho": 6.5}},
        "data": {"skip_bad": True},
    }
    cfg = load_config(None, ["train.lr=1e-3", "method.name=fastclip", "method.options={rho: 6.5}"])
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["epochs"] == 1  # defaults kept
    assert cfg["method"] == {"name": "fastclip", "options": {"rho": 6.5}, "common_options": {}}


@pytest.mark.parametrize(
    "bad,named,allowed",
    [
        (["train.lrr=1"], "train.lrr", "warmup_steps"),
        (["datta.workers=1"], "datta", "launcher"),
    ],
)
def test_unknown_keys_are_named_with_the_allowed_ones(bad, named, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, bad)
    assert named in str(err.value) and allowed in str(err.value)


def test_an_override_of_a_mapping_keeps_the_files_other_keys(tmp_path):
    """method.options, launcher and meta are free-form mappings: an override updates them key by key (dropping
    the file's other options would silently train another run); null empties one."""
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: fastclip\n  options: {rho: 6.5, gamma_min: 0.2}\nmeta: {dataset: cc3m}\n")
    cfg = load_config(path, ["method.options.gamma_min=0.5", "meta={seed: 1}"])
    assert cfg["method"]["options"] == {"rho": 6.5, "gamma_min": 0.5}
    assert cfg["meta"] == {"dataset": "cc3m", "seed": 1}
    assert load_config(path, ["method.options=null"])["method"]["options"] == {}


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  global_batch_size: 64\n  chekpoint_every: 10\n")
    with pytest.raises(ConfigError, match="train.chekpoint_every.*checkpoint_every"):
        load_config(path)


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.precision=fp16", "train.precision"),
        ("train.global_batch_size=1", "train.global_batch_size"),
        ("train.betas=[0.9]", "train.betas"),
        ("data.workers=-1", "data.workers"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


# docs/method.md §8: (model, global batch, epochs, lr, wd, warmup, rho, gamma_min, E_decay, lr_tau, betas, eps)
SETTINGS = {
    "cc3m": ("RN50", 1024, 37, 1e-3, 0.1, 10000, 6.5, 0.2, 18, 2e-4, [0.9, 0.999], 1e-8),
    "cc12m": ("ViT-B-32", 2048, 33, 4e-4, 0.1, 10000, 8.5, 0.2, 16, 1e-4, [0.9, 0.98], 1e-6),
    "dfn14m": ("ViT-B-32", 4096, 24, 5e-4, 0.2, 500, 11, None, None, 6.25e-5, [0.9, 0.98], 1e-6),
    "dfn192m": ("ViT-B-16", 5120, 7, 3.125e-4, 0.2, 500, 11, 1.0, 7, 7.8125e-5, [0.9, 0.98], 1e-6),
    "laion315m": ("ViT-B-16", 5120, 30, 2e-4, 0.2, 13200, 16, 0.8, 10, 5e-5, [0.9, 0.98], 1e-6),
}


@pytest.mark.parametrize("dataset", list(SETTINGS))
def test_paper_settings_are_expressible(dataset):
    from neuclip.commands.train import _check_method

    model, batch, epochs, lr, wd, warmup, rho, gmin, edecay, lr_tau, betas, eps = SETTINGS[dataset]
    fastclip = {
        "rho": rho,
        "gamma_schedule": "cosine",
        "gamma_min": gmin,
        "gamma_decay_epochs": edecay,
        "lr_tau": lr_tau,
        "tau_init": 0.07,
    }
    for method, options in (
        ("fastclip", fastclip),
        ("neuclip", {"rho": rho, "lr_tau": lr_tau, "tau_init": 0.07}),
        ("openclip", {"tau_init": 0.07}),
    ):
        cfg = load_config(
            None,
            [
                f"model={model}",
                f"train.global_batch_size={batch}",
                f"train.epochs={epochs}",
                f"train.lr={lr}",
                f"train.weight_decay={wd}",
                f"train.warmup_steps={warmup}",
                f"train.betas={betas}",
                f"train.eps={eps}",
                f"method.name={method}",
                f"method.options={json.dumps(options)}",
                "launcher.executor=slurm",
                "launcher.nodes=2",
                "launcher.gpus_per_node=4",
            ],
        )
        _check_method(cfg)
        assert cfg["train"]["betas"] == betas and cfg["method"]["options"] == options


def test_shipped_configs_load(tmp_path):
    from neuclip.commands.train import _check_method

    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        _check_method(cfg)


def test_resolve_fills_counts_and_paths(synth_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = train_pattern(synth_data)
    cfg = resolve(load_config(None, ["run_dir=runs/a", f"data.train_shards={shards}", "train.global_batch_size=16",
                                     "launcher.site=site.yaml"]))
    assert cfg["run_dir"] == str(tmp_path / "runs" / "a")
    assert cfg["data"]["train_num_samples"] == 48  # from sizes.json
    assert cfg["data"]["data_size"] == 216  # from dataset.yaml: img2dataset's keys of 3 x 16 samples, last 215
    assert cfg["launcher"] == {"site": "site.yaml"}  # not the trainer's: neuclip/grid/launcher.py completes it
    with pytest.raises(ConfigError, match="train_shards"):
        resolve(load_config(None, ["run_dir=r"]))


def test_identity_keys_are_every_key_but_the_run_settings():
    from neuclip.grid.launcher import launcher_section
    from neuclip.train.config import DEFAULTS, IDENTITY_KEYS, run_settings

    must = {"seed", "model", "data.train_shards", "method.options", "train.max_steps", "train.epochs", "train.lr"}
    assert must <= set(IDENTITY_KEYS)
    assert not [key for key in IDENTITY_KEYS if key.split(".")[0] in ("launcher", "meta", "run_dir")]
    settings = run_settings({**DEFAULTS, "launcher": launcher_section({})})
    assert set(settings["launcher"]) == set(launcher_section({}))  # resources and the executor: never identity
    assert {"workers"} <= set(settings["data"]) and {"log_every", "checkpoint_every"} <= set(settings["train"])
    flat = {f"{s}.{k}" for s, keys in settings.items() for k in keys}
    assert not flat & set(IDENTITY_KEYS)  # a key is one or the other


def test_a_rerun_with_a_changed_config_is_refused(synth_data, tmp_path):
    from neuclip.error_study.tracking import train
    from neuclip.train.testing import tiny_config

    shards = train_pattern(synth_data)
    cfg = tiny_config(tmp_path / "run", shards, **{"train.max_steps": 2})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "lr": 0.5}}))
    assert identity_diff(cfg, yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    with pytest.raises(ConfigError, match="train.lr"):
        train(cfg)


def test_print_config_shows_the_resolved_config(synth_data, tmp_path, capsys):
    from neuclip.cli import main

    shards = train_pattern(synth_data)
    assert (
        main(
            [
                "train",
                str(CONFIGS / "train_tiny.yaml"),
                f"run_dir={tmp_path}/r",
                f"data.train_shards={shards}",
                "method.name=neuclip",
                "train.global_batch_size=16",
                "--print-config",
            ]
        )
        == 0
    )
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"]["name"] == "neuclip" and cfg["data"]["train_num_samples"] == 48


def test_default_data_size_is_max_id_plus_one_not_the_sample_count(synth_data, tmp_path):
    """data.data_size unset: the data_size of dataset.yaml beside the shards, else max id + 1 from the shards'
    index. The synthetic set's 48 samples carry img2dataset's keys 0..15, 100..115, 200..215."""
    import shutil

    train = shutil.copytree(synth_data / "train", tmp_path / "train")
    info_file = train / "dataset.yaml"

    def data_size(last=2, *extra):
        pattern = str(train / f"{{00000..0000{last}}}.tar")
        overrides = ["run_dir=r", f"data.train_shards={pattern}", "train.global_batch_size=16", *extra]
        return resolve(load_config(None, overrides), tmp_path)["data"]["data_size"]

    assert data_size() == 216
    assert data_size(2, "data.data_size=300") == 300  # a set value wins
    info = yaml.safe_load(info_file.read_text())
    info_file.write_text(yaml.safe_dump({**info, "data_size": 5000}))
    assert data_size() == 5000  # the file is the source: not recomputed from the keys
    info_file.unlink()
    assert data_size() == 216 and data_size(1) == 116  # the index: the largest id of the shards named, + 1
    info_file.write_text("data_size: many\n")
    with pytest.raises(ConfigError, match=f"{info_file}: data_size 'many' is not a positive integer"):
        data_size()


def test_an_id_beyond_data_size_names_the_shard_key_and_file(synth_data, tmp_path):
    """The trainer's start-up check: the first sample whose id does not fit, and where data_size came from."""
    import shutil

    import torch

    from neuclip.train.data import DataError, expand_shards
    from neuclip.train.runtime import Process
    from neuclip.train.setup import make_data

    train = shutil.copytree(synth_data / "train", tmp_path / "train")
    info_file = train / "dataset.yaml"
    info_file.write_text(yaml.safe_dump({**yaml.safe_load(info_file.read_text()), "data_size": 150}))
    pattern = train_pattern(train.parent)
    cfg = resolve(load_config(None, ["run_dir=r", f"data.train_shards={pattern}", "train.global_batch_size=16"]),
                  tmp_path)  # fmt: skip
    assert cfg["data"]["data_size"] == 150
    with pytest.raises(DataError) as err:
        make_data(cfg, expand_shards(pattern), Process(0, 1, torch.device("cpu")))
    # every id at or above it is a bad sample (as `neuclip data check` says), the first named with the file
    assert f"shard {train / '00002.tar'} key 0000200: sample id 200 >= data_size 150 (from {info_file}): correct " \
        "its key" in str(err.value), str(err.value)
