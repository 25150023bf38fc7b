# The normaliser-error study: a shadow-estimator sweep over n and B (see neuclip/error_study/sweep.py).

from neuclip.error_study import SWEEP_FILES as ERROR_FILES

ERROR_DIR = f"{EXP_RUNS}/error_study"


def error_study_outputs():
    return [f"{ERROR_DIR}/{f}" for f in ERROR_FILES] if config.get("error_study") else []


# The sweep's config file: tracked (a changed grid, budget or shadow reruns the sweep); `jobs` is a setting.
rule error_sweep_config:
    output:
        f"{ERROR_DIR}/sweep.yaml",
    params:
        sweep=wf.sweep_config(config),
        text=lambda w: wf.yaml_text(wf.sweep_config(config)),
    localrule: True
    shell:  # like train_config: a shell rule, the file written whole then renamed
        "mkdir -p {ERROR_DIR:q} && printf '%s' {params.text:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}"


# A job of the launcher (stage `error_sweep`: CPU only, cpus_per_task = its processes).
rule error_sweep:
    input:
        f"{ERROR_DIR}/sweep.yaml",
    output:
        [f"{ERROR_DIR}/{f}" for f in ERROR_FILES],
    params:
        settings=lambda w: wf.stage_settings(
            config, "error_sweep", jobs=wf.sweep_jobs(config), experiment=config["experiment"]
        ),
    log:
        f"{EXP_RUNS}/logs/error_sweep.log",
    shell:
        "neuclip error sweep {input:q} --out {ERROR_DIR:q} {params.settings} > {log:q} 2>&1"


# Each training run's own estimate against exact normalisers over its training data (newest checkpoint), as a
# job of the launcher (stage `error_run`: the training cell's allocation).
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
        settings=lambda w: wf.stage_settings(config, "error_run", w.dataset),
    log:
        f"{EXP_RUNS}/logs/error_run/{RUN}.log",
    shell:
        "neuclip error run {params.run:q} --anchors 2048 {params.settings} > {log:q} 2>&1"
