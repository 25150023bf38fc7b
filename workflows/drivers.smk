# The driver study: each method trains its own runs on synthetic paired features over n/B, B, seeds and
# budgets (neuclip/study/drivers.py). Local CPU work, like the tables: `snakemake drivers`.

DRIVERS_DIR = f"{EXP_RESULTS}/drivers"
DRIVERS_FILES = ["runs.csv", "summary.csv", "learned.md", "claims.md", "accuracy_vs_ratio.png",
                 "accuracy_vs_batch.png"]


def drivers_outputs():
    return [f"{DRIVERS_DIR}/{f}" for f in DRIVERS_FILES] if config.get("drivers") else []


# The study's config file: tracked (a changed grid or option reruns the study); `jobs` is a setting.
rule drivers_config:
    output:
        f"{DRIVERS_DIR}/drivers.yaml",
    params:
        study={k: v for k, v in (config.get("drivers") or {}).items() if k != "jobs"},
        text=lambda w: wf.yaml_text({k: v for k, v in (config.get("drivers") or {}).items() if k != "jobs"}),
    localrule: True
    shell:
        "mkdir -p {DRIVERS_DIR:q} && printf '%s' {params.text:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}"


rule drivers_study:
    input:
        f"{DRIVERS_DIR}/drivers.yaml",
    output:
        [f"{DRIVERS_DIR}/{f}" for f in DRIVERS_FILES],
    params:
        jobs=(config.get("drivers") or {}).get("jobs", 1),
    threads: (config.get("drivers") or {}).get("jobs", 1)
    localrule: True
    log:
        f"{EXP_RUNS}/logs/drivers.log",
    shell:
        "neuclip study drivers {input:q} --out {DRIVERS_DIR:q} --jobs {params.jobs} > {log:q} 2>&1"
