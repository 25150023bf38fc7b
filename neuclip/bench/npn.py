"""`neuclip bench npn`: NeuCLIP's NPN block (docs/method.md §4 step 5) replicated vs sharded, and its matmul precision.

1. FLOP account at paper shapes (default: ViT-B/32, global batch 4096 on 8 ranks, m = 4096, T_u = 10),
   counted by torch.utils.flop_counter.FlopCounterMode on the real code: the open_clip model's forward and
   backward for one rank's batch (counted at a small batch, scaled linearly), the NeuCLIP estimator's encoder
   loss and its backward, and the NPN block on B' anchors (replicated: B' = the global batch on every rank;
   sharded: B' = the rank's own batch, plus an all-reduce of the W gradients, 2 m d floats, per inner step).
2. Measured per-rank NPN time on this CPU, both layouts: the block on B' anchors, and (sharded) the
   all-reduce of 2 m d floats between 2 gloo processes, T_u times.
3. tf32 / bf16 matmul inputs (npn_matmul): the same NPN fed the same batches from the same start; alpha after
   each iteration against the fp32 NPN's, at paper shapes. Off CUDA the tensor-core arithmetic is emulated
   exactly (inputs rounded, float32 products and sums: neuclip/nets.py), so the error is what a GPU gives.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from neuclip.bench.common import command_line, machine_line, publish
from neuclip.estimators import Batch, EstimatorContext, build_estimator, ops
from neuclip.estimators.ops import contrast_diffs, log_eps_g, positive_mask
from neuclip.export import create_model, register_model_configs


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--global-batch", type=int, default=4096)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--count-batch", type=int, default=4, help="batch the model's FLOPs are counted at")
    parser.add_argument("--precision-iterations", type=int, default=3)
    parser.add_argument("--precision-taus", type=float, nargs="+", default=[0.07, 0.01])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", metavar="MD", help="write the result section into this file (docs/benchmarks.md)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # internal: all-reduce timing


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _batch(n: int, d: int, seed: int, device="cpu"):
    """Clustered, correlated unit-vector pairs (image, text): 64 clusters, like embeddings of a real batch."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(64, d, generator=gen), dim=1)
    which = torch.randint(64, (n,), generator=gen)
    image = F.normalize(centres[which] + 0.6 * torch.randn(n, d, generator=gen) / math.sqrt(d) * 4, dim=1)
    text = F.normalize(image + 0.5 * torch.randn(n, d, generator=gen) / math.sqrt(d) * 4, dim=1)
    return image.to(device), text.to(device)


def _estimator(d: int, m: int, t_u: int, matmul: str = "fp32", seed: int = 0):
    opts = {"num_prototypes": m, "inner_steps": t_u, "npn_matmul": matmul, "seed": seed, "restart_sampling": "batch"}
    return build_estimator("neuclip", opts, EstimatorContext(embed_dim=d, data_size=10**6))


def _targets(image, text, tau, eps=1e-14):
    mask = positive_mask(image.shape[0], image.shape[0], 0, image.device)
    return (log_eps_g(contrast_diffs(image, text, 0) / tau, mask, eps),
            log_eps_g(contrast_diffs(text, image, 0) / tau, mask, eps))


def _npn_block(est, image, text, tau):
    """One NPN block on these anchors (the replicated code path on whatever rows it is given)."""
    pos = (image * text).sum(1)
    l1, l2 = _targets(image, text, tau)
    est._npn_block(image, text, pos, l1, l2, slice(0, image.shape[0]), tau)


def _model_flops(name: str, batch: int) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of the open_clip model on `batch` image-text pairs."""
    model, _, _, tokenizer = create_model(name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size)
    texts = tokenizer(["a photo of a cat on a mat"] * batch)

    def forward():
        out = model(images, texts)
        image_f, text_f = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        return image_f.sum() + text_f.sum()

    fwd = _flops(forward)
    both = _flops(lambda: forward().backward())
    return fwd, both


def _loss_flops(b: int, big_b: int, d: int, m: int) -> int:
    """The NeuCLIP estimator's encoder loss and its backward for one rank (b anchors, the global batch of B),
    the NPN applied to the local anchors once, without the NPN block (counted separately)."""
    est = _estimator(d, m, 1)
    est._npn_block = lambda *a, **k: None  # the block is counted on its own
    image, text = _batch(big_b, d, 1)
    x, y = image[:b].clone().requires_grad_(True), text[:b].clone().requires_grad_(True)

    def run():
        # one rank's view: local anchors against the gathered batch (the gather itself costs no FLOPs)

        real = ops.gather_with_grad
        ops.gather_with_grad = lambda t: torch.cat([t, (image if t is x else text)[b:]])
        try:
            est(Batch(x, y, torch.arange(b), 1, 0.0)).loss.backward()
        finally:
            ops.gather_with_grad = real

    return _flops(run)


def _time_block(est, rows: int, d: int, tau: float, repeats: int) -> float:
    image, text = _batch(rows, d, 2)
    est.restart(image, text)
    _npn_block(est, image, text, tau)  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        _npn_block(est, image, text, tau)
        best = min(best, time.perf_counter() - t0)
    return best


def _allreduce_child(world: int, floats: int, times: int, out: str) -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    flat = torch.randn(floats)
    dist.all_reduce(flat)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(times):
        dist.all_reduce(flat)
    seconds = time.perf_counter() - t0
    if dist.get_rank() == 0:
        Path(out).write_text(str(seconds))
    dist.destroy_process_group()
    return 0


def _allreduce_seconds(floats: int, times: int) -> float:
    import tempfile

    out = Path(tempfile.mkdtemp()) / "t"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "neuclip.bench.npn",
         "--child", "2", str(floats), str(times), str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return float(out.read_text())


def _precision(args, d: int) -> list[dict]:
    """alpha of the tf32 / bf16 NPN against the fp32 NPN: (forward) the fp32 NPN's own W evaluated with tf32 / bf16
    inputs, and (trained) after each iteration of NPNs that started alike and were fed the same batches. For the
    trained comparison an fp32 NPN fed the same rows in another order (only the order of the float sums over
    anchors differs) shows how far AdaGrad's normalised steps carry rounding alone."""
    rows = []
    modes = ("fp32", "fp32 (rows reordered)", "tf32", "bf16")
    for tau in args.precision_taus:
        ests = {mode: _estimator(d, args.prototypes, args.inner_steps, mode.split()[0]) for mode in modes}
        for it in range(args.precision_iterations):
            image, text = _batch(args.global_batch, d, 100 + it)
            order = torch.randperm(image.shape[0], generator=torch.Generator().manual_seed(it))
            back = torch.argsort(order)
            pos = (image * text).sum(1)
            alphas = {}
            for mode, est in ests.items():
                x, y = (image[order], text[order]) if "reordered" in mode else (image, text)
                if it == 0:
                    est.restart(image, text)
                _npn_block(est, x, y, tau)
                with torch.no_grad():
                    a1, a2 = est.npn(image, text, pos, 1.0 / tau, 1e-14)
                alphas[mode] = torch.cat([a1, a2]).double()
            del back
            ref = alphas["fp32"]
            l1, l2 = _targets(image, text, tau)
            gap = float((ref - torch.cat([l1, l2]).double()).abs().mean())
            npn = ests["fp32"].npn
            for mode in modes[1:]:
                diff = (alphas[mode] - ref).abs()
                row = {"tau": tau, "iteration": it + 1, "mode": mode, "max": float(diff.max()),
                       "mean": float(diff.mean()), "fp32_gap": gap, "forward_max": None, "forward_mean": None}
                if mode in ("tf32", "bf16"):
                    npn.matmul = mode
                    with torch.no_grad():
                        f1, f2 = npn(image, text, pos, 1.0 / tau, 1e-14)
                    npn.matmul = "fp32"
                    fdiff = (torch.cat([f1, f2]).double() - ref).abs()
                    row |= {"forward_max": float(fdiff.max()), "forward_mean": float(fdiff.mean())}
                rows.append(row)
    return rows


def run(args) -> int:
    if args.child:
        world, floats, times, out = args.child
        return _allreduce_child(int(world), int(floats), int(times), out)
    import open_clip


    register_model_configs()
    cfg = open_clip.get_model_config(args.model)
    d, m, t_u = int(cfg["embed_dim"]), args.prototypes, args.inner_steps
    big_b, w = args.global_batch, args.world
    b = big_b // w
    fwd, both = _model_flops(args.model, args.count_batch)
    model_step = both * b / args.count_batch
    loss = _loss_flops(b, big_b, d, m)
    est = _estimator(d, m, t_u)
    image, text = _batch(big_b, d, 3)
    est.restart(image, text)
    npn = {rows: _flops(lambda rows=rows: _npn_block(est, image[:rows], text[:rows], 0.07))
           for rows in (big_b, b)}
    targets_flops = {rows: _flops(lambda rows=rows: _targets(image[:rows], text[:rows], 0.07)) for rows in (big_b, b)}
    npn = {rows: npn[rows] - targets_flops[rows] for rows in npn}  # the targets come from the loss's logits
    times = {rows: _time_block(_estimator(d, m, t_u), rows, d, 0.07, args.repeats) for rows in (big_b, b)}
    comm_floats = 2 * m * d
    comm = _allreduce_seconds(comm_floats, t_u)
    precision = _precision(args, d)
    body = _markdown(args, d, b, fwd, model_step, loss, npn, times, comm, comm_floats, precision)
    publish(args, "npn", body)
    return 0


def _markdown(args, d, b, fwd, model_step, loss, npn, times, comm, comm_floats, precision) -> str:
    big_b, w, m, t_u = args.global_batch, args.world, args.prototypes, args.inner_steps
    g = 1e9
    rep, shard = npn[big_b], npn[b]
    lines = [
        "## NeuCLIP's NPN block: replicated vs sharded, matmul precision (`neuclip bench npn`)",
        "",
        f"Command: `{command_line()}`",
        f"Machine: {machine_line()}",
        "",
        f"FLOP account per rank and step at paper shapes: {args.model} (d = {d}), global batch {big_b} on {w} "
        f"ranks (b = {b} per rank), m = {m}, T_u = {t_u}; counted by FlopCounterMode on the real code (the model "
        f"at batch {args.count_batch}, scaled linearly: {fwd / args.count_batch / g:.2f} GFLOP forward per pair).",
        "",
        "| per rank and step | replicated | sharded |",
        "|---|---:|---:|",
        f"| model forward + backward ({b} pairs) | {model_step / g:,.0f} GFLOP | {model_step / g:,.0f} GFLOP |",
        f"| estimator loss + backward (b x B logits, NPN on local anchors) | {loss / g:,.1f} GFLOP | "
        f"{loss / g:,.1f} GFLOP |",
        f"| NPN block, T_u steps on B' anchors (B' = {big_b} / {b}) | {rep / g:,.0f} GFLOP | {shard / g:,.0f} GFLOP |",
        f"| NPN share of the step's FLOPs | {rep / (model_step + loss + rep):.1%} | "
        f"{shard / (model_step + loss + shard):.1%} |",
        f"| NPN communication (all-reduce of the W gradients, 2 m d floats x T_u) | none | "
        f"{comm_floats * 4 * t_u / 2**20:.0f} MiB |",
        "",
        f"Measured on this CPU (one rank's NPN block, best of {args.repeats}; the all-reduce between 2 gloo "
        "processes over loopback, T_u times):",
        "",
        "| per rank and step | replicated | sharded |",
        "|---|---:|---:|",
        f"| NPN block compute | {times[big_b]:.2f} s ({rep / times[big_b] / g:.0f} GFLOP/s) | "
        f"{times[b]:.2f} s ({shard / times[b] / g:.0f} GFLOP/s) |",
        f"| W-gradient all-reduce ({comm_floats * 4 / 2**20:.0f} MiB x {t_u}) | — | {comm:.2f} s |",
        f"| total | {times[big_b]:.2f} s | {times[b] + comm:.2f} s |",
        "",
        f"tf32 / bf16 inputs to the NPN's anchors x prototypes matmul (float32 products, sums and W; "
        f"{'CUDA tensor cores' if torch.cuda.is_available() else 'exact emulation on this CPU'}). `forward`: the "
        "fp32 NPN's W evaluated with tf32 / bf16 inputs, |alpha - alpha_fp32| over the batch's anchors and both "
        f"modalities. `trained`: NPNs that started alike, fed the same {big_b}-row batches (restart from the "
        f"first, T_u = {t_u} AdaGrad steps per iteration), each in its own precision; the fp32 NPN fed the "
        "rows reordered shows what rounding alone does to that trajectory. `fp32 gap`: the fp32 NPN's own "
        "mean |alpha - log(eps + g_hat)| on the batch, for scale.",
        "",
        "| tau | iteration | mode | forward max | forward mean | trained max | trained mean | fp32 gap |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in precision:
        fwd = ("—", "—") if r["forward_max"] is None else (f"{r['forward_max']:.1e}", f"{r['forward_mean']:.1e}")
        lines.append(f"| {r['tau']:g} | {r['iteration']} | {r['mode']} | {fwd[0]} | {fwd[1]} | {r['max']:.1e} | "
                     f"{r['mean']:.1e} | {r['fp32_gap']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
