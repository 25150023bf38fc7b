"""A key given twice in any YAML the project reads is refused, naming the key and both lines (PyYAML, and so
Snakemake, keep the second silently: a second `train:` section replaced the first's lr, epochs, warmup and
batch without a word). Through the loader, `neuclip train` (before a run folder exists), an experiment config
as the workflow loads it, and `snakemake -n --configfile`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuclip.cli import main
from neuclip.grid.experiment import load_experiment
from neuclip.train.testing import tiny_overrides, train_pattern
from neuclip.yamlio import DuplicateKeyError, yaml_load

REPO = Path(__file__).resolve().parent.parent
TWO_TRAIN_SECTIONS = """\
model: tiny-vit
train:
  lr: 1.0e-3
  max_steps: 12
data:
  shuffle_buffer: 32
train:
  warmup_steps: 2
"""


def test_the_loader_names_the_key_and_both_lines():
    with pytest.raises(DuplicateKeyError, match=r"duplicate key 'train'.*lines 2 and 7"):
        yaml_load(TWO_TRAIN_SECTIONS)
    with pytest.raises(DuplicateKeyError, match=r"duplicate key 'lr'.*lines 2 and 3"):
        yaml_load("train:\n  lr: 1\n  lr: 2\n")  # nested too
    assert yaml_load("a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n") == {"a": {"b": 1}, "c": {"b": 1, "d": 2}}
    assert yaml_load("eps: 1e-8\n") == {"eps": 1e-8}  # a float, as YAML 1.2 reads it


def test_neuclip_train_refuses_it_before_the_run_folder(tmp_path, synth_data, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(TWO_TRAIN_SECTIONS)
    run_dir = tmp_path / "run"
    shards = train_pattern(synth_data)
    code = main(["train", str(config), *tiny_overrides(run_dir, shards)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "c.yaml" in err and "duplicate key 'train'" in err and "lines 2 and 7" in err, err
    assert not run_dir.exists()


def test_an_experiment_config_with_a_repeated_section_is_refused(tmp_path):
    tiny = (REPO / "workflows/configs/tiny.yaml").read_text()
    config = tmp_path / "exp.yaml"
    config.write_text(tiny + "\nmethods: [openclip]\n")
    with pytest.raises(DuplicateKeyError, match=r"exp.yaml: duplicate key 'methods'"):
        load_experiment([config])


@pytest.mark.slow
def test_snakemake_refuses_it_before_scheduling(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text((REPO / "workflows/configs/tiny.yaml").read_text() + "\nmethods: [openclip]\n")
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-d",
                          str(tmp_path), "-n", "all", "--configfile", str(config)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    assert "duplicate key 'methods'" in out.stdout + out.stderr, out.stderr[-3000:]
