# Data: the synthetic set is generated; real shards are downloaded with img2dataset when the site names a URL
# list (`dataset_overrides: {cc3m: {download: {url_list: /data/cc3m.tsv, processes_count: 32}}}`: url_list plus
# any img2dataset options over neuclip/data/download.yaml) into the folder of the registry's shard pattern,
# and optionally checked once (check_data: true). `snakemake download` fetches every such data set.

import shlex
from pathlib import Path

import yaml


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


def download_settings(dataset):
    return dict(wf.registry(config)[dataset].get("download") or {})


def download_marker(dataset):
    """The download's marker (Snakemake tracks this small file, never the shard folder: it deletes a failed
    job's outputs, and img2dataset resumes from what the folder holds)."""
    return f"{EXP_RUNS}/data/{dataset}.downloaded" if download_settings(dataset).get("url_list") else []


rule data_download:
    output:
        f"{EXP_RUNS}/data/{{dataset}}.downloaded",
    params:
        url_list=lambda w: download_settings(w.dataset)["url_list"],
        out=lambda w: str(Path(wf.shards(config, w.dataset)).parent),
        sets=lambda w: " ".join(
            "--set " + shlex.quote(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
            for k, v in download_settings(w.dataset).items() if k != "url_list"
        ),
    log:
        f"{EXP_RUNS}/logs/data_download_{{dataset}}.log",
    shell:
        "neuclip data download {wildcards.dataset} --url-list {params.url_list:q} --out {params.out:q} {params.sets}"
        " > {log:q} 2>&1 && cp {params.out:q}/dataset.yaml {output:q}"


rule download:
    input:
        [download_marker(d) for d in config.get("datasets", []) if download_marker(d)],


rule data_check:
    input:
        lambda w: download_marker(w.dataset),
    output:
        f"{EXP_RUNS}/data/{{dataset}}.ready",
    params:
        pattern=lambda w: wf.shards(config, w.dataset),
        check=config.get("check_data", False),
    log:
        f"{EXP_RUNS}/logs/data_check_{{dataset}}.log",
    shell:
        "if [ {params.check} = True ]; then neuclip data check {params.pattern:q} > {log:q} 2>&1; fi; touch {output:q}"
