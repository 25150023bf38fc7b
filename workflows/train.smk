# Training: one run folder per (dataset, method, variant, seed). The rule writes the run's full
# `neuclip train` config (tracked through params, so a changed setting reruns it) and calls the launcher,
# which trains in-process or submits to SLURM through submitit (launcher: slurm) and waits.

wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    method="[a-z]+",
    variant="[^/]+",
    seed=r"\d+",
    suite="[a-z0-9_]+",


def run_of(w):
    return RUNS_BY_KEY[f"{w.dataset}/{w.method}/{w.variant}/seed{w.seed}"]


RUN = "{dataset}/{method}/{variant}/seed{seed}"


rule train_config:
    output:
        f"{EXP_RUNS}/configs/{RUN}.yaml",
    params:
        cfg=lambda w: wf.train_config(config, run_of(w)),
    localrule: True
    run:
        import yaml

        from neuclip.atomic import write_atomic

        write_atomic(output[0], yaml.safe_dump(params.cfg, sort_keys=False))


rule train:
    input:
        cfg=f"{EXP_RUNS}/configs/{RUN}.yaml",
        data=lambda w: str(wf.data_marker(config, w.dataset)),
    output:
        f"{EXP_RUNS}/{RUN}/done.json",
    log:
        f"{EXP_RUNS}/logs/train/{RUN}.log",
    shell:
        "neuclip train {input.cfg:q} > {log:q} 2>&1"
