"""The report's tables, built from loaded runs, the expected cell set and the published numbers.

Columns are keyed by (data set, scale). Only paper-scale columns get "published" and "Δ" columns; a tiny- or
small-scale column is labelled with its scale (and with its stand-in metric, when the paper's metric was not
evaluated there), so a synthetic or CPU-scale number can never sit under a paper column. Our cells are the
mean ± sample std (ddof = 1) over seeds, in percent; Δ = our mean − published.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from neuclip.eval.suites import GROUPS, TASKS
from neuclip.report.expect import Expected, Missing, seeds_for
from neuclip.report.loading import (
    METHOD_LABELS,
    Run,
    Study,
    dataset_label,
    sha256_file,
    sort_key_column,
    sort_key_method,
)
from neuclip.report.table import MISSING, NOT_PLANNED, NOT_REPORTED, Num, Stat, Table


@dataclass(frozen=True)
class Metric:
    kind: str  # "group" (summary.json groups) or "task" (summary.json tasks)
    key: str
    label: str
    suite: str  # the eval suite that produces it

    def value(self, run: Run) -> float | None:
        return (run.groups if self.kind == "group" else run.tasks).get(self.key)


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    metric: Metric
    stand_in: Metric | None  # used in non-paper columns that lack `metric`
    published: str  # section of published.yaml


DC38 = Metric("group", "datacomp38", "DataComp-38 avg", "datacomp38")
IMNET = Metric("group", "imagenet_variants", "ImageNet & variants top-1", "imagenet_variants")
RETRIEVAL = Metric("group", "retrieval", "Retrieval avg", "retrieval")
TINY = Metric("group", "tiny", "tiny-suite avg", "tiny")
SYNTH_RETRIEVAL = Metric("task", "synth_retrieval", "synthetic retrieval R@1", "tiny")

SPECS = [
    Spec("main", "DataComp-38 average (%) by data set and method", DC38, TINY, "datacomp38"),
    Spec("imagenet_variants",
         "ImageNet & variants, mean top-1 accuracy (%): the paper's 7-set mean (IN-1k, V2, Sketch, A, O, R, ObjectNet),"
         " not DataComp's \"ImageNet dist. shifts\" (the 6 sets without IN-1k)", IMNET, None, "imagenet_variants"),
    Spec("retrieval", "Retrieval average (%) (Flickr30k, MSCOCO recall@1, WinoGAViL)", RETRIEVAL, SYNTH_RETRIEVAL,
         "retrieval"),
]
PAIRS = [("SogCLR", "FastCLIP-v1"), ("iSogCLR", "FastCLIP-v2")]
SCALE_NOTE = ("Scales: [paper scale] = the paper's data and settings, compared with the published numbers; "
              "[small scale] and [tiny scale] = reduced CPU runs, never compared with them.")


CHANCE_ROW = "chance"


def chance_level(metric: Metric) -> float | None:
    """The metric's value at chance (fraction): the task's random score, or the plain mean of its group's tasks'
    (DataComp's averaging); None when a task of it has none (retrieval recall depends on the set's size)."""
    ids = GROUPS.get(metric.key, ()) if metric.kind == "group" else (metric.key,)
    scores = [TASKS[i].random_score for i in ids if i in TASKS]
    if not scores or any(s is None for s in scores):
        return None
    return sum(scores) / len(scores)


def chance_note(metric: Metric) -> str:
    ids = GROUPS.get(metric.key, ()) if metric.kind == "group" else (metric.key,)
    known = [f"{TASKS[i].name} {100 * TASKS[i].random_score:.3g}" for i in ids if TASKS[i].random_score is not None]
    unknown = [TASKS[i].name for i in ids if TASKS[i].random_score is None]
    note = f"chance for {metric.label}: per task (%) " + ", ".join(known) if known else ""
    if unknown:
        note += ("; " if note else f"chance for {metric.label}: ") + (
            "none defined for " + ", ".join(unknown) + " (recall at chance is k/N for N test items), so no chance row")
    return note


def column_metric(spec: Spec, col: tuple[str, str], runs: list[Run]) -> Metric | None:
    if col[1] == "paper" or any(spec.metric.value(r) is not None for r in runs):
        return spec.metric
    if spec.stand_in and (col[1] == "tiny" or any(spec.stand_in.value(r) is not None for r in runs)):
        return spec.stand_in
    return spec.metric if not runs else None  # nothing ran yet: expect the paper's metric


def header(col: tuple[str, str], metric: Metric, spec_metric: Metric) -> str:
    head = f"{dataset_label(col[0])} [{col[1]} scale]"
    return head if metric == spec_metric else f"{head} ({metric.label}, stand-in)"


def stat_cell(table: str, row: str, column: str, runs: list[Run], metric: Metric, col, method: str, variant: str,
              expected: list[Expected], missing: list[Missing]) -> Stat:
    here = sorted((r for r in runs if r.column == col and r.method == method and r.variant == variant),
                  key=lambda r: (r.seed is None, r.seed, r.path))
    vals = [(r, metric.value(r)) for r in here]
    vals = [(r, v) for r, v in vals if v is not None]
    seeds = seeds_for(expected, col, method, variant)
    stat = Stat([100 * v for _, v in vals], [r.path for r, _ in vals], expected=len(seeds))
    got = {r.seed for r, _ in vals}
    for seed in seeds:
        if seed not in got:
            run = next((r for r in here if r.seed == seed), None)
            missing.append(Missing(table, row, column, col[0], col[1], method, variant, seed,
                                   run.path if run else None, metric.suite))
    return stat


def published_values(published: dict, section: str) -> tuple[dict, str]:
    sec = published.get(section) or {}
    return sec.get("values") or {}, sec.get("source", "")


def method_table(spec: Spec, runs: list[Run], expected: list[Expected], published: dict, missing: list[Missing],
                 skipped: list[str], methods: list[str] | None = None, name: str | None = None,
                 title: str | None = None, section: str | None = None) -> Table:
    name, title, section = name or spec.name, title or spec.title, section or spec.published
    default = [r for r in runs if r.variant == "default"]
    exp = [e for e in expected if e.variant == "default"]
    cols = sorted({e.column for e in exp} | {r.column for r in default}, key=sort_key_column)
    if methods is None:
        methods = sorted({e.method for e in exp} | {r.method for r in default}, key=sort_key_method)
    pub, source = published_values(published, section)
    table = Table(name, title, "method", [], rows=list(methods), notes=[SCALE_NOTE])
    chance_rows = False
    for col in cols:
        metric = column_metric(spec, col, [r for r in default if r.column == col])
        if metric is None:
            skipped.append(f"`{name}`: {dataset_label(col[0])} [{col[1]} scale]: no run evaluated "
                           f"{spec.metric.label} (suite `{spec.metric.suite}`) and there is no stand-in at this scale")
            continue
        head = header(col, metric, spec.metric)
        if metric != spec.metric:
            table.notes.append(f"{head}: the {metric.label} stands in for the "
                               f"{spec.metric.label} (not comparable with paper numbers).")
        ours = f"{head} ours"
        table.columns.append(ours)
        chance = chance_level(metric)
        if chance is not None:
            table.cells[(CHANCE_ROW, ours)] = Num(100 * chance)
            chance_rows = True
        else:
            table.notes.append(f"{head}: {chance_note(metric)}.")
        with_pub = col[1] == "paper" and any(col[0] in v for v in pub.values())
        if with_pub:
            table.columns += [f"{head} published", f"{head} Δ"]
        for m in methods:
            stat = stat_cell(name, m, ours, runs, metric, col, m, "default", expected, missing)
            table.cells[(m, ours)] = stat
            if with_pub:
                p = (pub.get(m) or {}).get(col[0])
                ref = {"published": f"{section}.values.{m}.{col[0]}", "source": source}
                table.cells[(m, f"{head} published")] = Num(p, blank=NOT_REPORTED, sources=[ref] if p else [])
                delta = stat.mean - p if (p is not None and stat.n) else None
                table.cells[(m, f"{head} Δ")] = Num(delta, signed=True,
                                                    blank=MISSING if p is not None else NOT_REPORTED,
                                                    sources=stat.runs + ([ref] if p else []))
    if chance_rows:
        table.rows.append(CHANCE_ROW)
        table.notes.append(f"{CHANCE_ROW}: the metric at chance level (DataComp's random scores; 1/classes for the "
                           "synthetic tasks), averaged as the metric is.")
    if any(c.endswith(" published") for c in table.columns):
        table.notes.append(f"published: {source.strip().rstrip('.')}. n/r = not reported. Δ = our mean − published.")
    table.notes.append("ours: mean ± sample std over seeds (n = seeds found, n=k/K when K were expected); "
                       "— = expected but missing (see missing.md); n/a = no run expected.")
    return table


def fastclip_table(runs, expected, published, missing, skipped) -> Table:
    present = {r.method for r in runs if r.variant == "default"}
    present |= {e.method for e in expected if e.variant == "default"}
    pairs = [p for p in PAIRS if present & set(p)]
    methods = [m for p in pairs for m in p]
    table = method_table(SPECS[0], runs, expected, published, missing, skipped, methods=methods,
                         name="fastclip_comparison", section="fastclip_paper",
                         title="FastCLIP-paper comparison: DataComp-38 average (%), SogCLR vs FastCLIP-v1, "
                               "iSogCLR vs FastCLIP-v2")
    rows = []
    for a, b in pairs:
        gain = f"gain {b} − {a}"
        rows += [a, b, gain]
        for col in table.columns:
            ca, cb = table.cell(a, col), table.cell(b, col)
            if isinstance(ca, Stat):
                ok = ca.n and cb.n
                blank = NOT_PLANNED if 0 in (ca.expected, cb.expected) else MISSING
                table.cells[(gain, col)] = Num(cb.mean - ca.mean if ok else None, signed=True, blank=blank,
                                               sources=ca.runs + cb.runs)
            else:
                va, vb = ca.value if ca else None, cb.value if cb else None
                ok = va is not None and vb is not None
                blank = NOT_REPORTED if col.endswith("published") else MISSING
                table.cells[(gain, col)] = Num(vb - va if ok else None, signed=True, blank=blank,
                                               sources=(ca.sources if ca else []) + (cb.sources if cb else []))
    for col in table.columns:  # Δ of a gain row: our gain − published gain
        if col.endswith(" Δ"):
            for a, b in pairs:
                gain = f"gain {b} − {a}"
                ours, pub = table.cell(gain, col[:-2] + " ours"), table.cell(gain, col[:-2] + " published")
                ok = ours.value is not None and pub.value is not None
                table.cells[(gain, col)] = Num(ours.value - pub.value if ok else None, signed=True,
                                               blank=MISSING if pub.value is not None else NOT_REPORTED,
                                               sources=ours.sources + pub.sources)
    table.rows = rows
    if not pairs:
        table.notes.append("No SogCLR, iSogCLR, FastCLIP-v1 or FastCLIP-v2 runs under this root.")
    table.notes.append("FastCLIP-v1 = `fastclip` with version v1; FastCLIP-v2 = `isogclr` with gamma_schedule: cosine.")
    return table


def _variant_key(v: str, aliases: dict) -> str:
    k = str(v).lower().replace(" ", "")
    return aliases.get(k, k)


def ablation_tables(runs, expected, published, missing, skipped) -> list[Table]:
    abl = published.get("ablations") or {}
    aliases = {str(k).lower().replace(" ", ""): str(v).lower() for k, v in (abl.get("aliases") or {}).items()}
    tables = []
    exp_abl = [e for e in expected if e.variant != "default"]
    cols = sorted({r.column for r in runs if r.variant != "default"} | {e.column for e in exp_abl}, key=sort_key_column)
    for col in cols:
        col_runs = [r for r in runs if r.column == col]
        methods = sorted({r.method for r in col_runs if r.variant != "default"}
                         | {e.method for e in exp_abl if e.column == col}, key=sort_key_method)
        name = f"ablation_{col[0]}_{col[1]}"
        table = Table(name, f"Ablations on {dataset_label(col[0])} [{col[1]} scale] (%)", "method: variant", [],
                      notes=[SCALE_NOTE])
        pub_vals = (abl.get("values") or {}).get(col[0]) if col[1] == "paper" else None
        pub = {_variant_key(k, aliases): v for k, v in (pub_vals or {}).items()}
        for spec in SPECS:
            metric = column_metric(spec, col, col_runs)
            if metric is None:
                skipped.append(f"`{name}`: {spec.metric.label} not evaluated at this scale")
                continue
            head = f"{metric.label}{'' if metric == spec.metric else ' (stand-in)'} ours"
            table.columns.append(head)
            is_main = spec is SPECS[0]
            if is_main:
                table.columns.append("Δ vs default")
                if pub:
                    table.columns += ["published", "published Δ vs default"]
            for m in methods:
                variants = sorted({r.variant for r in col_runs if r.method == m} | {e.variant for e in exp_abl
                                  if e.column == col and e.method == m} | {"default"},
                                  key=lambda v: (v != "default", v))
                for v in variants:
                    row = f"{m}: {v}"
                    if row not in table.rows:
                        table.rows.append(row)
                    stat = stat_cell(name, row, head, runs, metric, col, m, v, expected, missing)
                    table.cells[(row, head)] = stat
                    if not is_main:
                        continue
                    base = table.cell(f"{m}: default", head)
                    ok = stat.n and base.n and v != "default"
                    table.cells[(row, "Δ vs default")] = ("(reference)" if v == "default" else
                                                          Num(stat.mean - base.mean if ok else None, signed=True,
                                                              sources=stat.runs + base.runs))
                    if pub:
                        mine = pub.get(_variant_key(v, aliases)) if m == abl.get("method") else None
                        ref = [{"published": f"ablations.values.{col[0]}.{v}", "source": abl.get("source", "")}]
                        table.cells[(row, "published")] = Num(mine, blank=NOT_REPORTED, sources=ref if mine else [])
                        d = mine - pub["default"] if (mine is not None and "default" in pub) else None
                        table.cells[(row, "published Δ vs default")] = (
                            "(reference)" if v == "default" else Num(d, signed=True, blank=NOT_REPORTED))
        if pub:
            table.notes.append(f"published: {abl.get('source', '').strip().rstrip('.')}. n/r = not reported.")
        table.notes.append("ours: mean ± sample std over seeds; Δ vs default = difference of the means.")
        tables.append(table)
    return tables


def stress_table(studies: list[Study], published: dict, root: Path) -> Table:
    sec = published.get("stress") or {}
    rows_pub = sec.get("rows") or {}
    cols = ["batch halved: error ratio", "data ×10: error ratio", "pairs (halved, ×10)",
            f"published {rows_pub.get('row1', 'row 1')}", f"published {rows_pub.get('row2', 'row 2')}", "scale"]
    table = Table("stress", "Normaliser-error stress tests: error growth of each estimator (ours beside the paper's)",
                  "estimator", cols)
    for study in studies:
        path = study.abspath / "stress.csv"
        frame = pd.read_csv(path)
        src = [{"file": f"{study.path}/stress.csv", "sha256": sha256_file(path)},
               {"file": f"{study.path}/errors.csv", "sha256": sha256_file(study.abspath / "errors.csv")}]
        for rec in frame.to_dict("records"):
            method = str(rec["method"])
            label = METHOD_LABELS.get(method, method)
            row = label if len(studies) == 1 else f"{study.path}: {label}"
            table.rows.append(row)
            paper = (sec.get("values") or {}).get(method) or {}
            pref = [{"published": f"stress.values.{method}", "source": sec.get("source", "")}]
            table.cells[(row, cols[0])] = Num(_float(rec.get("batch_halved_ratio")), sources=src)
            table.cells[(row, cols[1])] = Num(_float(rec.get("data_x10_ratio")), sources=src)
            table.cells[(row, cols[2])] = f"{rec.get('pairs_halved', '?')}, {rec.get('pairs_x10', '?')}"
            table.cells[(row, cols[3])] = Num(paper.get("row1"), digits=1, blank=NOT_REPORTED, sources=pref)
            table.cells[(row, cols[4])] = Num(paper.get("row2"), digits=1, blank=NOT_REPORTED, sources=pref)
            table.cells[(row, cols[5])] = str(rec.get("scale", "?"))
    table.notes.append("error ratio = final-step log-space MSE after the stress / before it (mean over seeds and over "
                       "the (n, B) pairs that allow it; `pairs` counts them). Batch halved: B/2 vs B at fixed n; "
                       "data ×10: 10n vs n at fixed B.")
    table.notes.append(f"published: {sec.get('source', '').strip()} {sec.get('note', '').strip()}")
    if not studies:
        table.notes.append(f"No error-study folder (errors.csv + stress.csv) under {root}.")
    return table


def _float(x) -> float | None:
    try:
        return None if x is None or pd.isna(x) else float(x)
    except (TypeError, ValueError):
        return None


def runs_table(runs: list[Run]) -> Table:
    cols = ["data set", "scale", "method", "variant", "seed", "DataComp-38", "ImageNet & variants", "Retrieval",
            "tiny suite", "config hash", "git commit"]
    table = Table("runs", "Every finished training run under the root, with its group averages (%)", "run", cols)
    for r in sorted(runs, key=lambda r: (sort_key_column(r.column), sort_key_method(r.method), r.variant, r.path)):
        table.rows.append(r.path)
        values = [dataset_label(r.dataset), r.scale, r.method, r.variant, str(r.seed)]
        values += [Num(100 * v if v is not None else None, sources=[r.path])
                   for v in (r.groups.get(g) for g in ("datacomp38", "imagenet_variants", "retrieval", "tiny"))]
        values += [r.config_hash[:12], (r.git_commit or "?")[:10] + ("+dirty" if r.git_dirty else "")]
        table.cells.update({(r.path, c): v for c, v in zip(cols, values)})
    table.notes.append("— in a group column: that suite was not evaluated for the run (see missing.md when it "
                       "feeds a table). Full hashes and package versions: runs.provenance.json.")
    return table
