"""`neuclip train` refuses a bad method option or path before a run folder exists, naming the key (issue: a
hostile tester's config cases). Each case goes through the real CLI entry point, as a user runs it."""

from __future__ import annotations

import pytest

from neuclip.cli import main
from neuclip.train.testing import tiny_overrides, train_pattern


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["method.name=neuclip", "method.options={inner_steps: 0}"], "method.options.inner_steps"),
        (["method.name=neuclip", "method.options={num_prototypes: 0}"], "method.options.num_prototypes"),
        (["method.name=neuclip", "method.options={num_prototypes: abc}"], "method.options.num_prototypes"),
        (["method.name=sogclr", "method.options={gamma: fast}"], "method.options.gamma"),
        (["method.name=fastclip", "method.options={lr_tau: fast}"], "method.options.lr_tau"),
        (["method.name=fastclip", "method.common_options={lr_tau: fast}"], "method.common_options.lr_tau"),
        (["method.name=fastclip", "method.common_options={rhoo: 6.5}"], "rhoo"),
        (["method.name=amorlip", "method.options={inner_steps: 0}"], "method.options.inner_steps"),
    ],
)
def test_bad_method_options_fail_before_the_run_folder(tmp_path, synth_data, capsys, overrides, named):
    run_dir = tmp_path / "run"
    code = main(["train", *tiny_overrides(run_dir, train_pattern(synth_data)), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert named in err, err
    assert not run_dir.exists()


def test_a_run_dir_with_a_newline_is_refused(tmp_path, synth_data, capsys):
    code = main(["train", *tiny_overrides(tmp_path / "run", train_pattern(synth_data)), 'run_dir="a\\nb"'])
    err = capsys.readouterr().err
    assert code == 2 and "run_dir" in err and "control character" in err, err
    assert not (tmp_path / "a").exists()


def test_prototypes_beyond_the_data_set_warn_and_name_the_fill_rule(tmp_path, synth_data, capsys):
    """48 samples, m = 64: allowed (the restart fills m rows with replacement plus jitter), with a warning."""
    code = main(["train", *tiny_overrides(tmp_path / "run", train_pattern(synth_data)), "method.name=neuclip",
                 "method.options={num_prototypes: 64}", "--print-config"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning" in err and "num_prototypes=64" in err and "with replacement plus Gaussian jitter" in err


def test_a_start_up_data_error_leaves_no_config_to_refuse_the_corrected_rerun(tmp_path, synth_data, capsys):
    """data.data_size below the largest sample id fails at start; the run folder keeps no config.yaml, so the
    same folder with the corrected value runs (it was refused as "a different config")."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, train_pattern(synth_data), train__max_steps=2)
    code = main(["train", *overrides, "data.data_size=10"])
    err = capsys.readouterr().err
    assert code != 0 and "data_size" in err, err
    assert not (run_dir / "config.yaml").exists()
    assert main(["train", *overrides]) == 0, capsys.readouterr().err
    assert (run_dir / "done.json").exists()


def test_epochs_that_round_to_no_step_are_refused(tmp_path, synth_data, capsys):
    """`epochs: 0.0001` silently became one step; it now asks for max_steps."""
    overrides = [o for o in tiny_overrides(tmp_path / "run", train_pattern(synth_data))
                 if not o.startswith("train.max_steps")]
    code = main(["train", *overrides, "train.epochs=0.0001"])
    err = capsys.readouterr().err
    assert code != 0 and "train.epochs (0.0001)" in err and "train.max_steps" in err, err
    assert not (tmp_path / "run" / "config.yaml").exists()
