"""`neuclip bench state`: per-sample estimator state at large data_size, through the real trainer.

For each data_size, method, world size (gloo processes under torchrun) and `state_placement`, a short run of
tiny-vit on synthetic shards whose sample ids are scattered over the whole range [0, data_size) (so the
state is indexed everywhere, as a real run's is): peak memory per rank, the checkpoint's files per rank, and a
SIGKILL-and-rerun twin whose final checkpoint (main file and every state shard) must be bit-identical to the
uninterrupted run's. Combinations whose estimated memory exceeds `--budget-gib` are skipped and said so.

Memory per rank is read by the process itself: VmHWM (peak resident set, which also counts the checkpoint
pages a resume maps from disk: clean, file-backed, reclaimable) and the peak of RssAnon sampled every 20 ms
(the process's own memory). Runs go one at a time; their folders are deleted after each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from neuclip.bench.common import command_line, machine_line, publish
from neuclip.cli import main
from neuclip.data.shards import write_tar
from neuclip.data.synth import _train_sample
from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import tensors_equal, tiny_config, write_config
from neuclip.yamlio import yaml_load

GIB = 1024**3
BASE_GIB = 0.6  # a tiny-vit trainer process without per-sample state (measured: about 0.5 GiB)


def add_arguments(parser) -> None:
    parser.add_argument("--data-sizes", type=float, nargs="+", default=[1e8, 2e8, 4e8, 1.4e9])
    parser.add_argument("--methods", nargs="+", default=["fastclip"])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--placements", nargs="+", default=["replicated", "sharded"])
    parser.add_argument("--samples", type=int, default=256, help="samples in the shards (ids scattered)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--budget-gib", type=float, default=18.0, help="skip combinations estimated above this")
    parser.add_argument("--no-resume", action="store_true", help="skip the SIGKILL-and-rerun twin")
    parser.add_argument("--workdir", default=None, help="where runs go (default: a temp folder)")
    parser.add_argument("--write", metavar="MD", help="write the result section into this file (docs/benchmarks.md)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one rank's `neuclip train CONFIG`


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _child(config: str) -> int:
    """One rank of a run: `neuclip train CONFIG`, then its peak memory to RUN/rss.rankR.json."""
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], _status("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    code = main(["train", config])
    done.set()
    run = Path(yaml_load(Path(config).read_text())["run_dir"])
    rank = int(os.environ.get("RANK", "0"))
    out = {"vm_hwm": _status("VmHWM"), "rss_anon_peak": max(peak[0], _status("RssAnon"))}
    (run / f"rss.rank{rank}.json").write_text(json.dumps(out))
    return code


def _shards(folder: Path, samples: int, data_size: int) -> str:
    """Synthetic samples re-keyed with ids drawn uniformly from [0, data_size), sorted, in shards of 64."""
    ids = sorted(random.Random(0).sample(range(data_size), samples))
    width = len(str(data_size - 1))
    folder.mkdir(parents=True)
    sizes = {}
    for k, start in enumerate(range(0, samples, 64)):
        made = []
        for i, sid in zip(range(start, start + 64), ids[start : start + 64]):
            key, fields, _ = _train_sample(i, 0, 32, f"{sid:0{width}d}")
            made.append((key, fields))
        sizes[f"{k:05d}.tar"] = write_tar(folder / f"{k:05d}.tar", made)
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def _config(work: Path, name: str, shards: str, data_size: int, method: str, placement: str, steps: int) -> Path:
    cfg = tiny_config(work / name, shards, **{
        "method.name": method, "method.options": {"state_placement": placement}, "data.data_size": data_size,
        "train.max_steps": steps, "train.checkpoint_every": max(1, steps // 2), "train.keep_last": 1,
        "train.warmup_steps": 0, "data.workers": 0})
    return write_config(work / f"{name}.yaml", cfg)


def _torchrun(config: Path, world: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m",
         "neuclip.bench.state", "--child", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{out[-3000:]}")


def _descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [p for c in map(int, children) for p in (c, *_descendants(c))]


def _files_equal(a: Path, b: Path) -> bool:
    """Two checkpoint files hold the same tensors bit for bit (memory-mapped; NaN, an unvisited id, equals NaN).
    A main file's config (its run_dir) and wall time differ between twins and are left out."""

    def bits(x):
        if isinstance(x, dict):
            return {k: bits(v) for k, v in x.items() if k not in ("config", "train_wall_s")}
        if torch.is_tensor(x) and x.is_floating_point():
            return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
        return repr(x) if isinstance(x, float) else x

    sa, sb = (torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in (a, b))
    return tensors_equal(bits(sa), bits(sb)) == []


def _one(work: Path, shards: str, data_size: int, method: str, world: int, placement: str, args) -> dict:
    cfg = _config(work, "ref", shards, data_size, method, placement, args.steps)
    t0 = time.perf_counter()
    _wait(_torchrun(cfg, world))
    seconds = time.perf_counter() - t0
    run = work / "ref"
    rss = [json.loads((run / f"rss.rank{r}.json").read_text()) for r in range(world)]
    folder = run / "checkpoints"
    main = ckpt.checkpoint_path(folder, args.steps)
    files = sorted(folder.glob(f"step_{args.steps:09d}.rank*.pt"))
    row = {
        "data_size": data_size, "method": method, "world": world, "placement": placement,
        "vm_hwm_gib": [r["vm_hwm"] / GIB for r in rss], "anon_gib": [r["rss_anon_peak"] / GIB for r in rss],
        "main_mib": main.stat().st_size / 2**20, "shard_gib": [f.stat().st_size / GIB for f in files],
        "seconds": seconds, "resume": None,
    }
    if not args.no_resume:
        twin = _config(work, "twin", shards, data_size, method, placement, args.steps)
        proc = _torchrun(twin, world)
        first = ckpt.checkpoint_path(work / "twin" / "checkpoints", max(1, args.steps // 2))
        while proc.poll() is None and not first.exists():
            time.sleep(0.05)
        if proc.poll() is None:
            for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and every rank, as a lost node
                os.kill(pid, signal.SIGKILL)
        killed_before_end = not (work / "twin" / "done.json").exists()
        proc.communicate()
        _wait(_torchrun(twin, world))
        other = work / "twin" / "checkpoints"
        same = [_files_equal(main, ckpt.checkpoint_path(other, args.steps))]
        same += [_files_equal(f, other / f.name) for f in files]
        row["resume"] = {"killed_before_end": killed_before_end, "bit_identical": all(same)}
        shutil.rmtree(work / "twin")
    shutil.rmtree(run)
    return row


def _bytes_per_id(method: str) -> int:
    return 40 if method == "isogclr" else 8


def run(args) -> int:
    if args.child:
        return _child(args.child)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_state_"))
    rows, skipped = [], []
    try:
        for size in (int(s) for s in args.data_sizes):
            shards = _shards(root / f"data_{size}", args.samples, size)
            for method in args.methods:
                for world in args.worlds:
                    for placement in args.placements:
                        if world == 1 and placement == "sharded" and "replicated" in args.placements:
                            continue  # one rank: the same layout
                        per_rank = _bytes_per_id(method) * size / (world if placement == "sharded" else 1) / GIB
                        need = world * (per_rank + BASE_GIB)
                        if need > args.budget_gib:
                            skipped.append(f"{method}, data_size {size:.2g}, {world} x {placement}: "
                                           f"~{need:.0f} GiB estimated > --budget-gib {args.budget_gib:g}")
                            continue
                        work = root / "runs"
                        work.mkdir(exist_ok=True)
                        row = _one(work, shards, size, method, world, placement, args)
                        print(json.dumps(row), flush=True)
                        rows.append(row)
            shutil.rmtree(root / f"data_{size}")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    body = _markdown(rows, skipped, args)
    publish(args, "state", body)
    return 0


def _markdown(rows: list[dict], skipped: list[str], args) -> str:
    def per_rank(values, fmt="{:.2f}"):
        return " / ".join(fmt.format(v) for v in values)

    lines = [
        "## Per-sample state at large data_size (`neuclip bench state`)",
        "",
        f"Command: `{command_line()}`",
        f"Machine: {machine_line()}; {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB",
        "",
        f"The real trainer (torchrun, gloo, tiny-vit, global batch 16, {args.steps} steps, a checkpoint half-way "
        f"and at the end) on {args.samples} synthetic samples whose ids are drawn uniformly from [0, data_size). "
        "Per rank (rank 0 / rank 1): peak anonymous memory (RssAnon sampled every 20 ms: the process's own "
        "memory), VmHWM (peak resident set, which also counts the checkpoint pages a resume maps: file-backed, "
        "reclaimable), and the state shard file each rank writes (replicated: one file, written by rank 0). "
        "Resume: a twin run SIGKILLed (torchrun and all ranks) after its half-way checkpoint, rerun; its final "
        "main file and every state shard compared with the uninterrupted run's, bit for bit.",
        "",
        "| method | data_size | ranks x placement | peak anon GiB/rank | VmHWM GiB/rank | state file GiB/rank | "
        "main file MiB | resume bit-identical | s |",
        "|---|---:|---|---|---|---|---:|---|---:|",
    ]
    for r in rows:
        resume = "—" if r["resume"] is None else (
            ("yes" if r["resume"]["bit_identical"] else "**no**")
            + ("" if r["resume"]["killed_before_end"] else " (not killed in time)"))
        lines.append(
            f"| {r['method']} | {r['data_size']:.2g} | {r['world']} x {r['placement']} | {per_rank(r['anon_gib'])} "
            f"| {per_rank(r['vm_hwm_gib'])} | {per_rank(r['shard_gib'])} | {r['main_mib']:.1f} | {resume} | "
            f"{r['seconds']:.0f} |"
        )
    if skipped:
        lines += ["", "Not run (memory): " + "; ".join(skipped) + "."]
    return "\n".join(lines)


if __name__ == "__main__":  # torchrun's entry for one rank: python -m neuclip.bench.state --child CONFIG
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
