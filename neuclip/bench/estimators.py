"""`neuclip bench estimators`: per-step cost of each estimator at paper-like shapes, and NeuCLIP's inner block
(T_u AdaGrad steps of the prototype NPN) as a fraction of this machine's measured matmul rate.

Step = the estimator's forward (including its inner block) + backward of its loss w.r.t. random leaf
embeddings (the encoders are not part of it). The OpenCLIP loss is the reference column.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuclip.bench.common import command_line, machine_line, matmul_rate, publish, timeit
from neuclip.estimators import Batch, EstimatorContext, build_estimator, method_names


def add_arguments(parser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--prototypes", type=int, default=4096, help="NeuCLIP m")
    parser.add_argument("--inner-steps", type=int, default=10, help="NeuCLIP T_u")
    parser.add_argument("--methods", nargs="+", default=method_names())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", metavar="MD", help="write the result section into this file (docs/benchmarks.md)")


def _options(method, args, inner_steps=None):
    if method == "neuclip":
        steps = args.inner_steps if inner_steps is None else inner_steps
        return {"num_prototypes": args.prototypes, "inner_steps": steps, "restart_every": 0}
    return {}


def step_time(method, options, batch, dim, repeats, device) -> float:
    ctx = EstimatorContext(embed_dim=dim, data_size=10 * batch, total_epochs=10, total_steps=1000)
    est = build_estimator(method, options, ctx).to(device)
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device)
    y = F.normalize(x + 0.5 * torch.randn(batch, dim, generator=gen).to(device), dim=1)
    ids = torch.randperm(10 * batch, generator=gen)[:batch].to(device)
    state = {"t": 0}

    def run():
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        est(Batch(xs, ys, ids, state["t"], 0.0)).loss.backward()
        state["t"] += 1
        if device != "cpu":
            torch.cuda.synchronize()

    return timeit(run, repeats=repeats)


def run(args) -> int:
    lines = [f"Command: `{command_line()}`", f"Machine: {machine_line()}, device {args.device}", ""]
    header = "| B | " + " | ".join(args.methods) + " |"
    lines += [
        f"Per-step time in ms (d = {args.dim}; NeuCLIP m = {args.prototypes}, T_u = {args.inner_steps}); "
        "in brackets: relative to the OpenCLIP loss.",
        "",
        header,
        "|---" * (len(args.methods) + 1) + "|",
    ]
    inner_rows = []
    for batch in args.batch_sizes:
        times = {m: step_time(m, _options(m, args), batch, args.dim, args.repeats, args.device) for m in args.methods}
        base = times.get("openclip")
        cells = [f"{1e3 * t:.1f}" + (f" ({t / base:.1f}x)" if base else "") for t in times.values()]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        if "neuclip" in args.methods:
            without = step_time("neuclip", _options("neuclip", args, 0), batch, args.dim, args.repeats, args.device)
            inner = times["neuclip"] - without
            # forward: B x m x d matmul per modality; backward: two more of the same size
            flops = args.inner_steps * 2 * 3 * 2.0 * batch * args.prototypes * args.dim
            rate = matmul_rate(batch, args.dim, args.prototypes, args.device)
            inner_rows.append((batch, 1e3 * inner, flops / inner / 1e9, rate / 1e9, flops / inner / rate))
    if inner_rows:
        lines += [
            "",
            "NeuCLIP inner block (T_u NPN steps) against a plain B x d x m matmul on the same device:",
            "",
            "| B | inner block ms | achieved GFLOP/s | matmul GFLOP/s | fraction |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {b} | {ms:.1f} | {got:.1f} | {peak:.1f} | {frac:.2f} |" for b, ms, got, peak, frac in inner_rows]
    text = "\n".join(lines)
    publish(args, f"estimators-{args.device}", "## Estimators (`neuclip bench estimators`)\n\n" + text)
    return 0
