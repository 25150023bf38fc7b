"""The job kinds besides training (eval, error-run, error-sweep): their work inside the job and their outputs.
(The stage commands' side of the launcher, `neuclip eval|error run|error sweep --launcher YAML`, is in
neuclip/jobs/launch.py; the kinds themselves in neuclip/jobs/records.py.)

Outputs and reruns. Each kind ends by writing one small file that Snakemake tracks (train done.json, eval
summary.json, error-run error.json; the sweep its tables, all rebuilt from its errors.json), and its job
returns that file's content. When the driver dies, a job may finish, or write its output and go on a moment,
while nobody waits: the rerun then deletes that output as incomplete. So the launcher
- restores the output from the job's result when a re-attached job ends without it (`restore_output`);
- reuses a job that already finished *the same work* (the job folder's job.json holds the work's key: its
  arguments but the run settings, and its inputs' stamps: the model files, the checkpoints, the sweep config)
  instead of submitting a second one (`reuse_finished`). Training has its own rule: a run whose newest
  checkpoint is its final step is exported in-process (neuclip/jobs/launch.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

from neuclip.atomic import write_json
from neuclip.error_study import SWEEP_FILES
from neuclip.error_study import run_error as pass_
from neuclip.jobs.records import KINDS, job_record

# Arguments that do not change a stage's result (run settings, like the train config's x-setting keys).
SETTING_ARGS = {"eval": {"batch_size", "workers"}, "error-run": {"batch_size"}, "error-sweep": {"jobs"}}
# The file eval and error-run jobs end by writing (and its JSON indent), which is also what the job returns.
OUTPUT_FILE = {"eval": ("summary.json", 1), "error-run": ("error.json", 2)}


# -- the work (called inside the job) --------------------------------------------------------------------


def run_eval(cfg: dict) -> dict:
    from neuclip.eval.runner import evaluate_suite

    a = cfg["args"]
    return evaluate_suite(
        a["model_dir"],
        a["suite"],
        a["data_root"],
        cfg["run_dir"],
        batch_size=a["batch_size"],
        workers=a["workers"],
        device=a.get("device"),
        precision=a["precision"],
        redo=a.get("redo", False),
        progress=False,
    )


def run_error(cfg: dict) -> dict | None:
    """The error pass on every rank when neuclip/error_study/run_error.py declares DISTRIBUTED = True (each rank
    streams its share, the partials are all-reduced); otherwise rank 0 alone, the others return at once."""
    a = cfg["args"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not getattr(pass_, "DISTRIBUTED", False):
        if int(os.environ.get("RANK", "0")) > 0:
            return None
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # one process: no process group to join
            os.environ.pop(key, None)
    return pass_.score_run(a["run"], anchors=a["anchors"], shards=a["shards"], batch=a["batch_size"])


def run_sweep(cfg: dict) -> dict:
    from neuclip.error_study.sweep import load_config, run_sweep

    a = cfg["args"]
    sweep = load_config(a["config"])
    if a.get("jobs") is not None:
        sweep["jobs"] = a["jobs"]
    frame = run_sweep(sweep, cfg["run_dir"])
    return {"out": cfg["run_dir"], "rows": len(frame)}


# -- outputs and reruns ----------------------------------------------------------------------------------


def _stamps(paths) -> list:
    out = []
    for p in sorted(paths):
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


@functools.cache  # the source does not change under a running command (work_key is asked twice a launch)
def code_fingerprint() -> str:
    """sha256 of the harness's own source (neuclip/, baselines/): a finished job of older code is never reused,
    whatever changed (an eval task's definition, the error pass, an estimator)."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for path in sorted([*(root / "neuclip").rglob("*.py"), *(root / "neuclip").rglob("*.yaml"),
                        *(root / "baselines").glob("*.py")]):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def work_key(kind: str, cfg: dict) -> str | None:
    """sha256 of what defines this job's result: its arguments but the run settings, its inputs' stamps
    (name, size, mtime) and the code (`code_fingerprint`). None for training (it has its own rule) and for a
    job that must not be reused (`redo`)."""
    a = cfg.get("args")
    if kind not in SETTING_ARGS or a is None or a.get("redo"):
        return None
    try:
        if kind == "eval":
            inputs = _stamps(p for p in Path(a["model_dir"]).iterdir() if p.is_file())
        elif kind == "error-run":
            inputs = _stamps(p for p in (Path(a["run"]) / "checkpoints").iterdir() if p.is_file())
        else:
            inputs = hashlib.sha256(Path(a["config"]).read_bytes()).hexdigest()
    except OSError:
        return None
    work = {k: v for k, v in a.items() if k not in SETTING_ARGS[kind]}
    text = json.dumps({"kind": kind, "args": work, "inputs": inputs, "code": code_fingerprint()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _result(folder: str | Path, job_id: str):
    """(outcome, value) of task 0's result file, or (None, None) while there is none."""
    from submitit.core.utils import JobPaths, pickle_load

    try:
        return pickle_load(JobPaths(Path(folder), job_id=str(job_id), task_id=0).result_pickle)
    except Exception:  # noqa: BLE001  (missing, truncated or unreadable: no result to use)
        return None, None


def _write_output(kind: str, cfg: dict, value) -> Path | None:
    """Write the kind's output from a successful job's result; returns the path written, None if not needed."""
    out = Path(cfg["run_dir"])
    if kind == "error-sweep":
        if all((out / f).exists() for f in SWEEP_FILES):
            return None
        import pandas as pd

        from neuclip.error_study.sweep import sort_frame, write_outputs

        saved = json.loads((out / "errors.json").read_text())
        order = list(dict.fromkeys(row["budget"] for row in saved["rows"]))
        write_outputs(sort_frame(pd.DataFrame(saved["rows"]), order), saved["config"], out)
        return out / "errors.csv"
    name, indent = OUTPUT_FILE[kind]
    if (out / name).exists():
        try:  # in place and the job's own (not another run's written there since): nothing to do
            if json.loads((out / name).read_text()) == json.loads(json.dumps(value)):
                return None
        except (OSError, ValueError):
            pass
    if not isinstance(value, dict):
        raise ValueError(f"the job's result cannot restore {out / name}")
    write_json(out / name, value, indent=indent)
    return out / name


def restore_output(kind: str, cfg: dict, job) -> int:
    """After a successful job: rewrite its output from its result if it is missing or not the job's (see the
    module doc)."""
    outcome, value = _result(job.paths.folder, job.job_id)
    try:
        written = _write_output(kind, cfg, value) if outcome == "success" else None
    except (OSError, ValueError, KeyError) as err:
        print(f"{KINDS[kind].command}: the job succeeded but its output is missing: {err}", file=sys.stderr)
        return 1
    if written is not None:
        print(f"{KINDS[kind].command}: {written} was removed after the job wrote it (a rerun after the driver died); "
              "restored from the job's result", file=sys.stderr, flush=True)
    return 0


def reuse_finished(kind: str, cfg: dict) -> int | None:
    """0 if the job folder's last job finished this very work successfully (its outputs restored if a rerun
    removed them), else None: then a job is needed."""
    key, record = work_key(kind, cfg), job_record(Path(cfg["run_dir"]))
    if key is None or not record or record.get("kind") != kind or record.get("work") != key:
        return None
    outcome, value = _result(record["folder"], record["job_id"])
    if outcome != "success":
        return None
    try:
        written = _write_output(kind, cfg, value)
    except (OSError, ValueError, KeyError):
        return None
    what = f"restored {written} from its result" if written else "its outputs are in place"
    print(f"{KINDS[kind].command}: job {record['job_id']} already did this work; {what}, no new job",
          file=sys.stderr, flush=True)
    if isinstance(value, dict) and kind != "error-sweep":
        print(json.dumps(value), flush=True)
    return 0
