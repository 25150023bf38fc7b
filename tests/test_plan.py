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


def test_plan_shows_each_cell_s_rho_beside_the_rule(capsys):
    assert main(["plan", "workflows/configs/paper.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    column = [c.strip() for c in lines[0].split("|")].index("rho (rule)")
    rho = {cells[1]: cells[column] for cells in ([c.strip() for c in line.split("|")] for line in lines[2:])
           if len(cells) > column}
    assert rho["cc3m/neuclip/default/seed0"] == "6.5 (6.50)"  # CC3M's recipe is where the rule is anchored
    assert rho["cc3m/isogclr/default/seed0"] == "7 (6.50)"  # its own script's rho, beside the rule's
    assert rho["cc3m/openclip/default/seed0"] == "—"  # no temperature penalty
