"""The report stage: tables (CSV, Markdown, LaTeX, provenance), plots and an index from a runs root.

    neuclip report --runs runs/tiny --out results/tiny

Modules: `loading` (find and read run folders and error studies), `expect` (expected cells, missing.md),
`table` (cell types and rendering), `tables` (the tables themselves), `plots`, `build` (all of it).
"""

from __future__ import annotations


def build_report(*args, **kwargs):
    from neuclip.report.build import build_report as build

    return build(*args, **kwargs)
