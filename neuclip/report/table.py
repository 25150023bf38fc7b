"""One report table: typed cells, rendered to Markdown and LaTeX (display strings) and CSV (numbers).

Cells are `Stat` (our mean ± std over seeds, in %, with the runs behind it), `Num` (a single number: a
published value, a delta, a ratio; with its sources), a plain string, or None. A Stat with no values and a
Num with no value render as "—" (missing), except published numbers the paper does not report ("n/r") and
cells outside the expected set that no run filled ("n/a": not part of any experiment grid). The CSV keeps
the same rows and columns but splits every Stat column into `mean`, `std`, `n`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from neuclip.atomic import write_atomic

MISSING = "—"
NOT_REPORTED = "n/r"
NOT_PLANNED = "n/a"


@dataclass
class Stat:
    values: list[float]  # percent, one per seed
    runs: list[str]  # run paths, same order
    expected: int | None = None  # seeds expected for this cell; 0 = not in the expected set

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (ddof = 1); None with fewer than two seeds."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def text(self) -> str:
        if not self.values:
            return NOT_PLANNED if self.expected == 0 else MISSING
        n = f"n={self.n}" if self.expected in (None, 0, self.n) else f"n={self.n}/{self.expected}"
        std = f" ± {self.std:.2f}" if self.std is not None else ""
        return f"{self.mean:.2f}{std} ({n})"


@dataclass
class Num:
    value: float | None
    signed: bool = False  # deltas print with a sign
    digits: int = 2
    blank: str = MISSING  # shown when value is None
    sources: list = field(default_factory=list)  # run paths, or dicts naming files / published sources

    def text(self) -> str:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return self.blank
        return f"{self.value:{'+' if self.signed else ''}.{self.digits}f}"


@dataclass
class Table:
    name: str
    title: str
    index_name: str
    columns: list[str]
    rows: list[str] = field(default_factory=list)
    cells: dict = field(default_factory=dict)  # (row, column) -> Stat | Num | str | None
    notes: list[str] = field(default_factory=list)

    def cell(self, row: str, column: str):
        return self.cells.get((row, column))

    def display(self) -> pd.DataFrame:
        data = {self.index_name: self.rows}
        for col in self.columns:
            data[col] = [_text(self.cell(r, col)) for r in self.rows]
        return pd.DataFrame(data, columns=[self.index_name, *self.columns])

    def numeric(self) -> pd.DataFrame:
        data: dict[str, list] = {self.index_name: list(self.rows)}
        for col in self.columns:
            cells = [self.cell(r, col) for r in self.rows]
            if any(isinstance(c, Stat) for c in cells):
                data[f"{col} mean"] = [_num(c) for c in cells]
                data[f"{col} std"] = [c.std if isinstance(c, Stat) else None for c in cells]
                data[f"{col} n"] = [c.n if isinstance(c, Stat) else None for c in cells]
            else:
                data[col] = [_num(c) if isinstance(c, Num) else c for c in cells]
        return pd.DataFrame(data)

    def sources(self) -> list[dict]:
        out = []
        for r in self.rows:
            for col in self.columns:
                c = self.cell(r, col)
                entry = {"row": r, "column": col, "display": _text(c)}
                if isinstance(c, Stat):
                    entry |= {"runs": c.runs, "values_percent": c.values, "mean": c.mean, "std": c.std, "n": c.n}
                elif isinstance(c, Num):
                    entry |= {"value": c.value, "runs": [s for s in c.sources if isinstance(s, str)],
                              "sources": [s for s in c.sources if not isinstance(s, str)]}
                else:
                    continue
                out.append(entry)
        return out


def _text(c) -> str:
    if isinstance(c, (Stat, Num)):
        return c.text()
    return MISSING if c is None else str(c)


def _num(c):
    if isinstance(c, Stat):
        return c.mean
    if isinstance(c, Num):
        return c.value
    return None


def markdown(table: Table) -> str:
    frame = table.display()
    body = frame.to_markdown(index=False, disable_numparse=True) if len(frame) else _empty_md(frame)
    notes = "".join(f"\n- {n}" for n in table.notes)
    return f"### {table.title}\n\n{body}\n{notes}\n"


def _empty_md(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n| (no rows) |" + " |" * (len(cols) - 1)


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "---",
    "Δ": r"$\Delta$", "×": r"$\times$", "∞": r"$\infty$", "−": "--", "τ": r"$\tau$", "≤": r"$\le$",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex(table: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); written by hand so no jinja2 is needed."""
    frame = table.display()
    align = "l" + "r" * len(table.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering\small",
        rf"\caption{{{latex_escape(table.title)}}}",
        rf"\label{{tab:{table.name}}}",
        rf"\begin{{tabular}}{{{align}}}",
        r"\toprule",
        " & ".join(latex_escape(c) for c in frame.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines.append(r"\par\smallskip\footnotesize " + " ".join(latex_escape(n) for n in table.notes))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(table: Table, folder: Path, runs: dict, extra: dict | None = None) -> list[Path]:
    """tables/<name>.{csv,md,tex,provenance.json}; `runs` maps run path -> Run (for the provenance file)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / table.name
    cells = table.sources()
    used = sorted({p for c in cells for p in c.get("runs", [])})
    prov = {
        "table": table.name,
        "title": table.title,
        "units": "percent unless the column says otherwise",
        "cells": cells,
        "runs": {p: runs[p].provenance() for p in used if p in runs},
        **(extra or {}),
    }
    outputs = {
        stem.with_suffix(".csv"): table.numeric().to_csv(index=False, float_format="%.6g"),
        stem.with_suffix(".md"): markdown(table),
        stem.with_suffix(".tex"): latex(table),
        folder / f"{table.name}.provenance.json": json.dumps(prov, indent=1, default=str) + "\n",
    }
    for path, text in outputs.items():
        write_atomic(path, text)
    return list(outputs)
