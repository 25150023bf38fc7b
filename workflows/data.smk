# Data: the synthetic set is generated; real shards are optionally checked once (check_data: true).


rule data_synth:
    output:
        str(wf.synthetic_dir(config, "{dataset}") / "manifest.json"),
    params:
        out=lambda w: str(wf.synthetic_dir(config, w.dataset)),
        s=config.get("synthetic", {}),
    log:
        f"{EXP_RUNS}/logs/data_synth_{{dataset}}.log",
    shell:
        "neuclip data synth {params.out:q} --num-train {params.s[num_train]} --num-eval {params.s[num_eval]}"
        " --seed {params.s[seed]} --shard-size {params.s[shard_size]} --image-size {params.s[image_size]}"
        " > {log:q} 2>&1"


rule data_check:
    output:
        f"{EXP_RUNS}/data/{{dataset}}.ready",
    params:
        pattern=lambda w: wf.shards(config, w.dataset),
        check=config.get("check_data", False),
    log:
        f"{EXP_RUNS}/logs/data_check_{{dataset}}.log",
    shell:
        "if [ {params.check} = True ]; then neuclip data check {params.pattern:q} > {log:q} 2>&1; fi; touch {output:q}"
