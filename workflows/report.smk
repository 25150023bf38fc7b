# Report: tables (CSV, Markdown, LaTeX) and plots from every run and the error study, then the same sorted
# into the four categories `snakemake --report report.html` embeds (workflows/report/report_items.py turns
# each table into a small HTML page; the report shows HTML and images inline). Captions: workflows/report/.

import sys

report: "report/workflow.rst"


def report_label(wildcards):
    """What the report's result list shows for a file: "name (table)", "name (plot)" or "name (data)". One
    label only: with two, Snakemake turns a two-valued second label into a toggle that hides rows."""
    kind = next(k for k in ("table", "plot", "data") if k in wildcards.keys())
    return {"result": f"{wildcards[kind]} ({kind})"}


rule report:
    input:
        all_eval_summaries(),
        error_study_outputs(),
    output:
        index=f"{EXP_RESULTS}/index.md",
        main=report(
            directory(f"{EXP_RESULTS}/report/main_tables"),
            patterns=["{table}.html", "{plot}.png"],
            category="Main tables",
            labels=report_label,
            caption="report/main_tables.rst",
        ),
        error=report(
            directory(f"{EXP_RESULTS}/report/error_study"),
            patterns=["{plot}.png", "{table}.html", "{data}.csv"],
            category="Error study",
            labels=report_label,
            caption="report/error_study.rst",
        ),
        curves=report(
            directory(f"{EXP_RESULTS}/report/training_curves"),
            patterns=["{plot}.png"],
            category="Training curves",
            labels=report_label,
            caption="report/training_curves.rst",
        ),
        per_run=report(
            directory(f"{EXP_RESULTS}/report/per_run"),
            patterns=["{table}.html"],
            category="Per run",
            labels=report_label,
            caption="report/per_run.rst",
        ),
    params:
        runs=EXP_RUNS,
        out=EXP_RESULTS,
        sorter=f"{workflow.current_basedir}/report/report_items.py",
        python=sys.executable,  # the environment Snakemake runs in has the package's dependencies (markdown)
    log:
        f"{EXP_RUNS}/logs/report.log",
    shell:
        "(neuclip report --runs {params.runs:q} --out {params.out:q} && {params.python:q} {params.sorter:q} {params.out:q})"
        " > {log:q} 2>&1"
