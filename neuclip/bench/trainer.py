"""`neuclip bench trainer`: our trainer's throughput against open_clip's own trainer, side by side.

Both run as fresh processes, one after the other, on the same model, global batch, precision, thread count
and data-loader worker count:
- ours: `neuclip train` on synthetic img2dataset shards (real JPEG decoding, seeded shuffle), for each
  requested method (default: openclip and neuclip, so the NeuCLIP-vs-OpenCLIP step cost is visible too);
- open_clip: `python -m open_clip_train.main --dataset-type synthetic` (PIL images made on the fly), run
  through a two-line wrapper that registers the repo's model configs first (tiny-vit is not built in).
Both time each step from the end of the previous one (data wait included) and log it; the first
`--skip` steps (start-up, allocator warm-up) are dropped and the rest averaged as total samples / total
time. Each trainer runs `--repeats` times in alternating order and its best run counts (on a shared machine
other processes only ever slow a run down).
Prints a table and a markdown snippet to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neuclip.data.synth import synthesize

WRAPPER = (
    "import sys, torch, open_clip; from neuclip.export import MODEL_CONFIG_DIR; "
    "open_clip.add_model_config(MODEL_CONFIG_DIR); torch.set_num_threads(int(sys.argv.pop(1))); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny-vit", help="open_clip model name (default tiny-vit)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument("--skip", type=int, default=8, help="first steps left out of the average (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each trainer (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers in each (default 1)")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="default: bf16 autocast on a GPU, fp32 on CPU (ours: train.precision; open_clip: fp32 / amp_bf16)",
    )
    parser.add_argument("--methods", default="openclip,neuclip", help="our methods to time (comma-separated)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating order; best kept")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp folder, deleted)")


def _harmonic(samples_per_s: list[float], batch: int) -> float:
    """Total samples / total time over steps whose rates are given."""
    return len(samples_per_s) * batch / sum(batch / r for r in samples_per_s)


def _ours(work: Path, shards: str, args, method: str, precision: str) -> dict:
    run_dir = work / f"ours-{method}"
    cmd = [
        sys.executable,
        "-m",
        "neuclip.cli",
        "train",
        f"run_dir={run_dir}",
        f"model={args.model}",
        f"data.train_shards={shards}",
        "train.lr=1e-3",
        f"data.workers={args.workers}",
        f"method.name={method}",
        f"train.global_batch_size={args.batch_size}",
        f"train.max_steps={args.steps}",
        f"train.threads={args.threads}",
        f"train.precision={precision}",
        "train.log_every=1",
        f"train.checkpoint_every={args.steps + 1}",
        "train.warmup_steps=5",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"neuclip train failed:\n{proc.stderr[-3000:]}")
    rates = [json.loads(x)["samples_per_s"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"trainer": "neuclip train", "method": method, "rates": rates, "wall_s": wall, "cmd": cmd}


def _open_clip(work: Path, args, precision: str) -> dict:
    cmd = [
        sys.executable,
        "-c",
        WRAPPER,
        str(args.threads),
        "--dataset-type",
        "synthetic",
        "--train-num-samples",
        str(args.batch_size * args.steps),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        "1",
        "--model",
        args.model,
        "--precision",
        "fp32" if precision == "fp32" else "amp_bf16",
        "--workers",
        str(args.workers),
        "--lr",
        "1e-3",
        "--warmup",
        "5",
        "--wd",
        "0.1",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--report-to",
        "",
        "--seed",
        "0",
        "--logs",
        str(work / "open_clip"),
        "--name",
        f"bench-{os.getpid()}-{int(time.time())}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,", text)]
    if proc.returncode != 0 or not rates:
        raise RuntimeError(f"open_clip_train failed (exit {proc.returncode}):\n{text[-3000:]}")
    return {
        "trainer": "open_clip_train",
        "method": "ClipLoss",
        "rates": rates,
        "wall_s": wall,
        "cmd": ["python", "-m", "open_clip_train.main", *cmd[4 : cmd.index("--logs")], "--logs", "DIR"],
    }


def run(args) -> int:
    import torch


    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    methods = [m for m in args.methods.split(",") if m]
    tmp = None
    if args.out:
        work = Path(args.out)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="neuclip-bench-trainer-")
        work = Path(tmp.name)
    runs: dict[tuple, list[dict]] = {}
    try:
        data = work / "data"
        if not (data / "manifest.json").exists():
            synthesize(
                data,
                num_train=max(1024, args.batch_size * 16),
                num_eval=8,
                seed=0,
                shard_size=max(64, args.batch_size),
                image_size=32,
            )
        n = len(json.loads((data / "manifest.json").read_text())["train"]["shards"])
        shards = f"{data}/train/{{00000..{n - 1:05d}}}.tar"
        order = [("open_clip", "ClipLoss")] + [("ours", m) for m in methods]
        for rep in range(args.repeats):
            for kind, method in order if rep % 2 == 0 else order[::-1]:
                if kind == "open_clip":
                    res = _open_clip(work, args, precision)
                else:
                    res = _ours(work / f"rep{rep}", shards, args, method, precision)
                res["samples_per_s"] = _harmonic(res["rates"][args.skip :] or res["rates"], args.batch_size)
                runs.setdefault((kind, method), []).append(res)
                print(
                    f"run {rep + 1}: {res['trainer']} ({res['method']}) {res['samples_per_s']:.1f} samples/s",
                    flush=True,
                )
    finally:
        if tmp is not None:
            tmp.cleanup()
    results = [max(rs, key=lambda r: r["samples_per_s"]) for rs in runs.values()]
    for r in results:
        r["ms_per_step"] = 1000 * args.batch_size / r["samples_per_s"]
    base = results[0]["samples_per_s"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    setup = (
        f"{args.model}, global batch {args.batch_size}, {precision}, {args.threads} thread(s), "
        f"{args.workers} loader worker(s), {args.steps} steps (first {args.skip} dropped), best of "
        f"{args.repeats} alternating runs, {device}"
    )
    lines = ["| trainer | loss | samples/s | ms/step | vs open_clip_train |", "|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['trainer']} | {r['method']} | {r['samples_per_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{r['samples_per_s'] / base:.2f}x |"
        )
    print(f"\n{setup}\n")
    print("\n".join(lines))
    ours = results[1:]
    if ours:
        print(f"\nratio ours({ours[0]['method']}) / open_clip_train = {ours[0]['samples_per_s'] / base:.3f}")
    for r in ours[1:]:
        print(f"step time {r['method']} / {ours[0]['method']} = {r['ms_per_step'] / ours[0]['ms_per_step']:.3f}")
    keys = ("model", "batch_size", "steps", "skip", "threads", "workers", "methods", "repeats")
    command = "neuclip bench trainer " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}"
        for k, v in sorted(vars(args).items())
        if k in keys and v is not None
    )
    print("\n--- markdown (paste into docs/benchmarks.md) ---")
    print(f"### Trainer throughput\n\n`{command}` — {setup}; measured {time.strftime('%Y-%m-%d')}.\n")
    print("\n".join(lines))
    print(
        "\nopen_clip_train ran as `" + " ".join(shlex.quote(c) for c in results[0]["cmd"]) + "` with the "
        "repo's model configs registered; ours as `neuclip train` on synthetic JPEG shards (decoding "
        "included). Step time measured from the end of the previous step, data wait included."
    )
    return 0
