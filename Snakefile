# neuclip-bench: the whole experiment on one page.
#
#   snakemake -c2 all                                     # the tiny default, on this machine (minutes)
#   snakemake --profile slurm all --configfile workflows/configs/paper.yaml   # the paper grid on SLURM
#
# Stages: data (synthesise or check) -> train (neuclip train, through the launcher) -> eval (clip_benchmark)
# -> error study (shadow estimators) -> report (tables and plots). Every rule runs a `neuclip` command a
# person can run by hand. Snakemake tracks small final files (done.json, summary.json), never checkpoint
# folders: it deletes a failed job's declared outputs, and the trainer resumes from its own checkpoints.
from snakemake.utils import min_version

min_version("9.0")

# The tiny config is the default only when no --configfile names an experiment: a `configfile:` directive
# would otherwise be merged *under* the user's file and leak tiny settings into the paper grid.
if "experiment" not in config:

    configfile: f"{workflow.basedir}/workflows/configs/tiny.yaml"


import neuclip.grid.workflow as wf
import neuclip.yamlio

# Snakemake's YAML reader keeps the last of two equal keys silently (a second `train:` replaces the first):
# read every config file again with the project's reader, which refuses that naming the key and both lines.
for _path in [*workflow.configfiles, *workflow.overwrite_configfiles]:
    neuclip.yamlio.load_file(_path)

wf.validate_config(config)

# `rehearsal:` (e.g. a second --configfile workflows/configs/rehearsal.yaml): this experiment's own grid and
# code path with only sizes shrunk (neuclip/grid/rehearsal.py). The shrunk config is validated like any other.
import neuclip.grid.rehearsal

if config.get("rehearsal"):
    _shrunk = neuclip.grid.rehearsal.rehearse(config)
    config.clear()
    config.update(_shrunk)
    wf.validate_config(config)

# Every cell's start-up checks, before anything is queued: a broken cell fails `snakemake -n`, naming the cell
# and the key (neuclip/grid/preflight.py). Under the SLURM launcher, also every stage's request against the nodes
# of the cluster `sinfo` answers for (none on a laptop).
import neuclip.grid.cluster_fit
import neuclip.grid.preflight

_cluster = neuclip.grid.cluster_fit.cluster_nodes() if config.get("launcher") == "slurm" else None
neuclip.grid.preflight.print_warnings(neuclip.grid.preflight.preflight(config, cluster=_cluster))

RUNS = wf.runs(config)
RUNS_BY_KEY = {r.key: r for r in RUNS}
EXP_RUNS = str(wf.experiment_dir(config, "runs"))
EXP_RESULTS = str(wf.experiment_dir(config, "results"))


include: "workflows/data.smk"
include: "workflows/train.smk"
include: "workflows/eval.smk"
include: "workflows/error.smk"
include: "workflows/report.smk"
include: "workflows/drivers.smk"


# `all` names the evaluations and the error study as well as the report: Snakemake regenerates a missing
# file only when something requested needs it, so a deleted eval result is rerun (and the report after it).
rule all:
    input:
        rules.report.output,
        all_eval_summaries(),
        error_study_outputs(),


rule tables:
    input:
        rules.report.output,


rule error_study:
    input:
        error_study_outputs(),
        error_run_outputs(),


# The driver study (neuclip/study/drivers.py): every method trains its own small runs on synthetic features.
rule drivers:
    input:
        drivers_outputs(),


rule ablations:
    input:
        [eval_summary(r, s) for r in wf.ablation_runs(config) for s in wf.eval_suites(config, r.dataset)],
