# Training: one run folder per (dataset, method, variant, seed). `train_config` writes the run's `neuclip
# train` config without its run settings; `train` calls the launcher, which trains in-process or submits to SLURM through
# submitit (launcher: slurm) and waits. What reruns a cell is its identity alone (neuclip.train.config
# IDENTITY_KEYS: model, data, method and its options, seed, batch, schedule, step budget): those are
# train_config's params. Its run settings (resources, launcher, loader workers, log and checkpoint intervals,
# error tracking) reach the command as untracked overrides, current at run time (neuclip/grid/workflow.py).

from neuclip.estimators.registry import METHOD_NAME

wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    method=METHOD_NAME,
    variant="[^/]+",
    seed=r"\d+",
    suite="[a-z0-9_]+",


def run_of(w):
    return RUNS_BY_KEY[f"{w.dataset}/{w.method}/{w.variant}/seed{w.seed}"]


RUN = "{dataset}/{method}/{variant}/seed{seed}"


# A shell rule, not `run:` (Snakemake 9 runs each `run:` job in a new process that parses the whole workflow
# again, preflight included: ~45 s a cell here). The file is written whole, then renamed into place.
rule train_config:
    output:
        f"{EXP_RUNS}/configs/{RUN}.yaml",
    params:
        identity=lambda w: wf.identity(config, run_of(w)),
        text=lambda w: wf.yaml_text(wf.config_file(config, run_of(w))),
    localrule: True
    shell:
        "printf '%s' {params.text:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}"


rule train:
    input:
        cfg=f"{EXP_RUNS}/configs/{RUN}.yaml",
        data=lambda w: str(wf.data_marker(config, w.dataset)),
    output:
        f"{EXP_RUNS}/{RUN}/done.json",
    params:
        settings=lambda w: wf.train_settings(config, run_of(w)),
    log:
        f"{EXP_RUNS}/logs/train/{RUN}.log",
    shell:
        "neuclip train --supersede {input.cfg:q} {params.settings} > {log:q} 2>&1"
