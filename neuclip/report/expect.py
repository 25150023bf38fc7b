"""Which cells the report expects, and what is missing from them.

Without `--expect`, the expected set is read off the runs found, per experiment (`meta.experiment`, one
experiment config = one grid): every (data set, scale) of the experiment x every method with a default-variant
run in it x the seeds seen for that data set; and every ablation (data set, scale, method, variant) found x
the seeds seen over that data set's ablation runs. Seeds are taken per data set, not globally, because the
paper itself uses 3 seeds on small sets and 1 on large ones. A table cell outside the expected set with no run
shows "n/a" (not part of any grid), not "—".

`--expect FILE` (YAML) replaces it; a list of entries, each
    {dataset: cc3m, scale: paper, methods: [openclip, FastCLIP-v1, neuclip], seeds: [0, 1, 2], variants: [default]}
(`method:` for one; `scale` defaults to the scale the runs of that data set have, else "paper"; `variants`
defaults to [default]). Methods are registry names or report labels ("fastclip" = FastCLIP-v3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from neuclip.report.loading import Run, canonical_method, dataset_key, dataset_label, method_name
from neuclip.yamlio import yaml_load


@dataclass(frozen=True)
class Expected:
    dataset: str
    scale: str
    method: str
    variant: str
    seeds: tuple[int, ...]

    @property
    def column(self) -> tuple[str, str]:
        return (self.dataset, self.scale)


def from_runs(runs: list[Run]) -> list[Expected]:
    """Per experiment (meta.experiment): its data sets x its methods x the seeds seen per data set; ablation
    variants x the seeds seen over that data set's ablation runs. Merged over experiments (seeds unioned)."""
    merged: dict[tuple, set] = {}
    for exp in {r.experiment for r in runs}:
        mine = [r for r in runs if r.experiment == exp]
        default = [r for r in mine if r.variant == "default"]
        methods = {r.method for r in default}
        for col in {r.column for r in default}:
            seeds = {r.seed for r in default if r.column == col and r.seed is not None}
            for m in methods:
                merged.setdefault((*col, m, "default"), set()).update(seeds)
        ablation = [r for r in mine if r.variant != "default"]
        for col in {r.column for r in ablation}:
            here = [r for r in ablation if r.column == col]
            seeds = {r.seed for r in here if r.seed is not None}
            for m, v in {(r.method, r.variant) for r in here}:
                merged.setdefault((*col, m, v), set()).update(seeds)
    return [Expected(*key, tuple(sorted(seeds))) for key, seeds in sorted(merged.items())]


def from_file(path: str | Path, runs: list[Run]) -> list[Expected]:
    entries = yaml_load(Path(path).read_text()) or []
    if isinstance(entries, dict):
        entries = entries.get("expect", [])
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of {{dataset, methods, seeds}} entries")
    scales = {r.dataset: r.scale for r in runs}
    out = []
    for i, entry in enumerate(entries):
        keys = set(entry) if isinstance(entry, dict) else set()
        if not {"dataset", "seeds"} <= keys or not {"method", "methods"} & keys:
            raise ValueError(f"{path}: entry {i} ({entry!r}) needs dataset, method (or methods) and seeds")
        ds = dataset_key(entry["dataset"])
        scale = str(entry.get("scale", scales.get(ds, "paper")))
        methods = entry.get("methods") or [entry["method"]]
        for m in methods:
            for v in entry.get("variants", ["default"]):
                out.append(Expected(ds, scale, canonical_method(m), str(v), tuple(int(s) for s in entry["seeds"])))
    return out


def seeds_for(expected: list[Expected], col, method: str, variant: str) -> tuple[int, ...]:
    for e in expected:
        if e.column == col and e.method == method and e.variant == variant:
            return e.seeds
    return ()


@dataclass
class Missing:
    table: str
    row: str
    column: str
    dataset: str
    scale: str
    method: str
    variant: str
    seed: int | None
    run: str | None  # the run folder when the run exists but its evaluation does not
    suite: str | None  # the eval suite that would produce the value

    def describe(self, root: Path, runs: list[Run]) -> str:
        what = (f"{self.method} on {dataset_label(self.dataset)} [{self.scale}], variant {self.variant}, "
                f"seed {self.seed}")
        if self.seed is None:
            return f"{what}: no run found, and the expected set lists no seeds for it"
        if self.run:
            return (f"{what}: run `{self.run}` is done but has no `{self.suite}` result; produce it with "
                    f"`neuclip eval --model-dir {root / self.run / 'model'} --suite {self.suite} "
                    f"--data-root <eval sets> --out {root / self.run / 'eval' / self.suite}`")
        guess = guess_run_path(runs, self)
        where = f" (by analogy with its siblings, expected at `{root / guess}`)" if guess else ""
        return (f"{what}: no finished training run{where}; produce it with `neuclip train` for that config "
                f"(or `snakemake -c2 tables`), then evaluate it on `{self.suite}`")


def guess_run_path(runs: list[Run], m: Missing) -> str | None:
    """Swap the seed (or the method) in the path of a run that differs from the missing one only there."""
    for r in runs:
        same = (r.dataset, r.scale, r.method, r.variant) == (m.dataset, m.scale, m.method, m.variant)
        if same and r.seed is not None:
            new = re.sub(rf"(seed[_=-]?|s){r.seed}(?!\d)", rf"\g<1>{m.seed}", r.path)
            if new != r.path:
                return new
    for r in runs:
        if (r.dataset, r.scale, r.variant, r.seed) == (m.dataset, m.scale, m.variant, m.seed):
            parts = r.path.split("/")
            if r.method_name in parts:
                target = method_name(m.method)
                return "/".join(target if p == r.method_name else p for p in parts)
    return None


def missing_markdown(items: list[Missing], skipped: list[str], unfinished: list[str], warnings: list[str],
                     root: Path, runs: list[Run]) -> str:
    lines = ["# Missing results", "",
             f"Runs root: `{root}`. Every table cell shown as \"—\" (or with n=k/K, fewer seeds than expected) "
             "is listed here with the run that would fill it.", ""]
    if not items:
        lines.append("Nothing is missing: every expected cell has all its seeds.")
    by_cell: dict[tuple, list[Missing]] = {}
    for m in items:
        by_cell.setdefault((m.table, m.row, m.column), []).append(m)
    table = None
    for (tname, row, col), ms in by_cell.items():
        if tname != table:
            table = tname
            lines += ["", f"## Table `{tname}`", ""]
        lines.append(f"- **{row} / {col}**")
        lines += [f"  - {m.describe(root, runs)}" for m in ms]
    if skipped:
        lines += ["", "## Columns not shown", ""] + [f"- {s}" for s in skipped]
    if unfinished:
        lines += ["", "## Unfinished run folders (config.yaml but no done.json)", ""]
        lines += [f"- `{root / p}`" for p in unfinished]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"
