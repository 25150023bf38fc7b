# Evaluation: clip_benchmark on the run's exported model, one summary.json per suite, as a job of the launcher
# (stage `eval`: one GPU, its own time limit; requeued, it resumes past the finished tasks). Tracked: the model
# (done.json), the suite, data and precision; batch size, workers and the launcher are untracked settings.


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
        # eval.precision when set; otherwise the CLI's default (DataComp's choices) applies
        precision=lambda w: f"--precision {p}" if (p := config.get("eval", {}).get("precision")) else "",
        settings=lambda w: wf.stage_settings(
            config,
            "eval",
            w.dataset,
            batch_size=config.get("eval", {}).get("batch_size", 256),
            workers=config.get("eval", {}).get("workers", 4),
        ),
    log:
        f"{EXP_RUNS}/logs/eval/{RUN}/{{suite}}.log",
    shell:
        "neuclip eval --model-dir {params.model:q} --suite {wildcards.suite} --data-root {params.root:q}"
        " --out {params.out:q} {params.precision} --no-progress {params.settings} > {log:q} 2>&1"
