"""`neuclip plan`: every cell of a grid with what it costs, the start-up minutes included."""

from __future__ import annotations

from neuclip.cli import main
from neuclip.commands.plan import startup_minutes
from neuclip.grid.workflow import REPO
from neuclip.yamlio import yaml_load


def test_start_up_minutes_follow_the_measured_fit():
    fit = {"first_start": {"seconds_fixed": 30.0, "seconds_per_sample": 2e-7},
           "later_start": {"seconds_fixed": 6.0, "seconds_per_sample": 1e-9}}
    assert startup_minutes(1_400_000_000, fit) == f"{(30 + 280) / 60:.1f} / {(6 + 1.4) / 60:.1f}"
    assert startup_minutes(None, fit) is None and startup_minutes(10, None) is None


def test_plan_shows_each_cell_s_start_up_from_the_measured_file(capsys):
    assert main(["plan", "workflows/configs/paper.yaml"]) == 0
    out = capsys.readouterr().out
    fit = yaml_load((REPO / "workflows" / "startup.yaml").read_text())
    assert "start-up min, first / later" in out and fit["measured_by"] in out
    dfn1b = next(line for line in out.splitlines() if line.startswith("| dfn1b/neuclip/"))
    assert startup_minutes(1_000_000_000, fit) in dfn1b  # DFN-1B's num_samples in workflows/datasets.yaml
