"""An experiment config as the Snakefile's workflow sees it, for the commands that read one without Snakemake
(`neuclip plan`): above both the workflow's rules and the rehearsal's shrinking, which it composes."""

from __future__ import annotations

from pathlib import Path

from neuclip.grid.rehearsal import rehearse
from neuclip.grid.workflow import deep_merge, validate_config
from neuclip.yamlio import load_file


def load_experiment(paths: list[str | Path], **values) -> dict:
    """Experiment config files merged in order (as Snakemake merges several --configfile), `values` over them
    (as --config), validated, and shrunk when it asks for a rehearsal: what the Snakefile's workflow sees."""
    config: dict = {}
    for path in paths:
        config = deep_merge(config, load_file(path) or {})
    config = deep_merge(config, values)
    validate_config(config)
    if config.get("rehearsal"):
        config = rehearse(config)
        validate_config(config)
    return config
