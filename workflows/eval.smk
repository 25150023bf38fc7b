# Evaluation: clip_benchmark on the run's exported model, one summary.json per suite.


def eval_summary(run, suite):
    return f"{wf.run_dir(config, run)}/eval/{suite}/summary.json"


def all_eval_summaries():
    return [eval_summary(r, s) for r in RUNS for s in wf.eval_suites(config, r.dataset)]


rule evaluate:
    input:
        f"{EXP_RUNS}/{RUN}/done.json",
    output:
        f"{EXP_RUNS}/{RUN}/eval/{{suite}}/summary.json",
    params:
        model=f"{EXP_RUNS}/{RUN}/model",
        out=f"{EXP_RUNS}/{RUN}/eval/{{suite}}",
        root=lambda w: wf.eval_data_root(config, w.dataset),
        batch=config.get("eval", {}).get("batch_size", 256),
        workers=config.get("eval", {}).get("workers", 4),
        # eval.precision when set; otherwise the CLI's default (DataComp's choices) applies
        precision=lambda w: f"--precision {p}" if (p := config.get("eval", {}).get("precision")) else "",
    log:
        f"{EXP_RUNS}/logs/eval/{RUN}/{{suite}}.log",
    shell:
        "neuclip eval --model-dir {params.model:q} --suite {wildcards.suite} --data-root {params.root:q}"
        " --out {params.out:q} --batch-size {params.batch} --workers {params.workers} {params.precision}"
        " --no-progress > {log:q} 2>&1"
