# The normaliser-error study: a shadow-estimator sweep over n and B (see neuclip/error_study/sweep.py).

ERROR_DIR = f"{EXP_RUNS}/error_study"
ERROR_FILES = ["errors.csv", "fits.csv", "stress.csv", "stress.md", "error_vs_ratio.png", "error_over_steps.png"]


def error_study_outputs():
    return [f"{ERROR_DIR}/{f}" for f in ERROR_FILES] if config.get("error_study") else []


rule error_sweep:
    output:
        [f"{ERROR_DIR}/{f}" for f in ERROR_FILES],
    params:
        sweep=config.get("error_study"),
    log:
        f"{EXP_RUNS}/logs/error_sweep.log",
    threads: 2
    run:
        import yaml
        from pathlib import Path

        Path(ERROR_DIR).mkdir(parents=True, exist_ok=True)
        Path(f"{ERROR_DIR}/sweep.yaml").write_text(yaml.safe_dump(params.sweep, sort_keys=False))
        shell("neuclip error sweep {ERROR_DIR}/sweep.yaml --out {ERROR_DIR} --jobs {threads} > {log:q} 2>&1")


# Each training run's own estimate against exact normalisers over its training data (newest checkpoint).
from neuclip.estimators.registry import scored_methods

SCORED_METHODS = set(scored_methods())  # derived from each estimator's estimate_kind


def error_run_outputs():
    return [f"{wf.run_dir(config, r)}/error/error.json" for r in RUNS if r.method in SCORED_METHODS]


rule error_run:
    input:
        f"{EXP_RUNS}/{RUN}/done.json",
    output:
        f"{EXP_RUNS}/{RUN}/error/error.json",
    params:
        run=f"{EXP_RUNS}/{RUN}",
    log:
        f"{EXP_RUNS}/logs/error_run/{RUN}.log",
    shell:
        "neuclip error run {params.run:q} --anchors 2048 > {log:q} 2>&1"
