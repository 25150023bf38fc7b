"""`neuclip bench exact`: the exact-normaliser streaming pass (neuclip/error_study/exact.py) against this
machine's matmul rate, and its peak memory as n grows (it must stay O(anchor_block x chunk), never n x n).

FLOPs counted: the two (a x d) @ (d x n) similarity products per anchor block (image and text anchors); the
exp/log-sum-exp work on the (a x chunk) logits is the overhead that keeps the fraction below 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from neuclip.bench.common import command_line, machine_line, publish, timeit
from neuclip.error_study.exact import CPU_CHUNK, exact_log_normalizers


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144], help="n values")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--anchors", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=None, help="columns per step (default: exact.py's, 2048 on CPU)")
    parser.add_argument("--anchor-block", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", metavar="MD", help="write the result section into this file (docs/benchmarks.md)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one pass in a fresh process


def _data(n, d):
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    return x, F.normalize(x + torch.randn(n, d, generator=gen), dim=1)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_mib(args, n) -> float:
    """RSS with the embeddings, and peak RSS during one pass, of a fresh process (MiB)."""
    cmd = [
        sys.executable,
        "-m",
        "neuclip.cli",
        "bench",
        "exact",
        "--one",
        str(n),
        "--dim",
        str(args.dim),
        "--anchors",
        str(args.anchors),
        "--chunk",
        str(args.chunk),
        "--anchor-block",
        str(args.anchor_block),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    return float(out[-2]) / 1024, float(out[-1]) / 1024


def run(args) -> int:
    args.chunk = args.chunk or CPU_CHUNK
    if args.one:  # child process of the memory measurement: print RSS before and peak RSS during, in KiB
        image, text = _data(args.one, args.dim)
        anchors = torch.arange(args.anchors)
        base = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS (Linux >= 4.0)
        exact_log_normalizers(image, text, 0.07, 1e-14, anchors, args.chunk, args.anchor_block)
        print(base, _rss_kib("VmHWM"))
        return 0
    lines = [
        f"Command: `{command_line()}`",
        f"Machine: {machine_line()}",
        "",
        f"Exact pass for {args.anchors} anchors against all n (d = {args.dim}, chunk {args.chunk}, "
        f"anchor block {args.anchor_block}, float32). `matmul only` runs the same sequence of block x chunk "
        "matmuls without the log-sum-exp, timed right before each row (side by side: the machine is noisy); "
        "`fraction` = its time / the pass's time, i.e. the share of the matmul rate the pass keeps:",
        "",
        "| n | seconds | GFLOP/s | matmul only GFLOP/s | fraction of matmul | RSS with embeddings MiB | peak RSS MiB "
        "| extra MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in args.sizes:
        image, text = _data(n, args.dim)
        anchors = torch.arange(args.anchors)

        def one_pass(image=image, text=text, anchors=anchors):
            exact_log_normalizers(image, text, 0.07, 1e-14, anchors, args.chunk, args.anchor_block)

        def matmuls_only(image=image, text=text, anchors=anchors):
            for start in range(0, anchors.numel(), args.anchor_block):
                idx = anchors[start : start + args.anchor_block]
                for anchor, others in ((image[idx], text), (text[idx], image)):
                    for c0 in range(0, others.shape[0], args.chunk):
                        anchor @ others[c0 : c0 + args.chunk].T

        flops = 2 * 2.0 * args.anchors * n * args.dim
        peak = flops / timeit(matmuls_only, repeats=args.repeats)
        seconds = timeit(one_pass, repeats=args.repeats)
        rate = flops / seconds
        base, top = _peak_rss_mib(args, n)
        lines.append(
            f"| {n} | {seconds:.3f} | {rate / 1e9:.1f} | {peak / 1e9:.1f} | {rate / peak:.2f} | {base:.0f} | "
            f"{top:.0f} | {top - base:.0f} |"
        )
        print(lines[-1], flush=True)
    text_out = "\n".join(lines)
    publish(args, "exact", "## Exact normalisers (`neuclip bench exact`)\n\n" + text_out)
    return 0
