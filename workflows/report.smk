# Report: tables (CSV, Markdown, LaTeX) and plots from every run and the error study.


rule report:
    input:
        all_eval_summaries(),
        error_study_outputs(),
    output:
        index=report(f"{EXP_RESULTS}/index.md", category="Overview"),
    params:
        runs=EXP_RUNS,
        out=EXP_RESULTS,
    log:
        f"{EXP_RUNS}/logs/report.log",
    shell:
        "neuclip report --runs {params.runs:q} --out {params.out:q} > {log:q} 2>&1"
