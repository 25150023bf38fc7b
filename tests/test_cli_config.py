"""`neuclip config`: one experiment cell's train config, the file the workflow's train rule would write (the
one CC3M recipe is paper.yaml's cc3m cell; there is no second copy to drift)."""

from __future__ import annotations

from pathlib import Path

import yaml

from neuclip.cli import main
from neuclip.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "workflows" / "configs" / "paper.yaml"


def test_paper_cc3m_cell_is_a_valid_train_config(tmp_path, capsys):
    from neuclip.commands.train import _check_method

    assert main(["config", str(PAPER), "cc3m", "neuclip", "1"]) == 0
    path = tmp_path / "cc3m.yaml"
    path.write_text(capsys.readouterr().out)
    cfg = load_config(path)  # what `neuclip train cc3m.yaml` reads: unknown keys or bad values would raise
    _check_method(cfg)
    assert (cfg["model"], cfg["seed"], cfg["method"]["name"]) == ("RN50", 1, "neuclip")
    t = cfg["train"]
    assert (t["global_batch_size"], t["epochs"], t["warmup_steps"]) == (1024, 37, 10000)
    assert cfg["method"]["common_options"]["rho"] == 6.5 and cfg["run_dir"].endswith("paper/cc3m/neuclip/default/seed1")


def test_the_seed_defaults_to_the_first_and_a_missing_cell_lists_the_grid(capsys):
    assert main(["config", str(PAPER), "cc3m", "fastclip"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 0
    assert main(["config", str(PAPER), "cc3m", "neuclip", "7"]) == 2
    err = capsys.readouterr().err
    assert "no cell cc3m/neuclip/default/seed7" in err and "seeds of cc3m: 0, 1, 2" in err and "amorlip" in err
