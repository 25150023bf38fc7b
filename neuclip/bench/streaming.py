"""`neuclip bench streaming`: the distributed streaming error pass (neuclip/error_study/exact.py StreamingExact).

Two measurements, each process a fresh one (so its peak memory is its own):
- equality: 1, 2 and 3 gloo processes stream their shares of the same rows (with 3, the third rank holds
  none), combine their partials, and are compared with the one-process in-memory pass
  (`exact_log_normalizers`, float64 sums) and the mini-batch estimate of the same partition;
- memory: one process streams n rows chunk by chunk (as the embedding loop hands them over) against fixed
  anchors, at n and 16 n; next to it the in-memory pass, which holds all n rows. Peak resident memory (VmHWM)
  above the process's memory before the pass.

Rows are generated per chunk from a seed (correlated unit-vector pairs), so any process can make any chunk
and no process needs more than one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from neuclip.bench.common import command_line, machine_line, publish
from neuclip.error_study.estimates import minibatch_log_normalizers
from neuclip.error_study.exact import StreamingExact, exact_log_normalizers
from neuclip.error_study.run_error import _partition

CHUNK = 8192  # rows per chunk handed to the pass (an embedding loop's batches)


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=65536, help="rows for the equality check")
    parser.add_argument("--memory-n", type=int, nargs=2, default=[65536, 1048576], help="n and 16 n")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--anchors", type=int, default=2048)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=1024, help="mini-batch estimate's batch size")
    parser.add_argument("--write", metavar="MD", help="write the result section into this file (docs/benchmarks.md)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal


def rows(start: int, stop: int, dim: int):
    """Rows [start, stop) of the synthetic data set: a chunk is a function of its first row and the dim."""
    gen = torch.Generator().manual_seed(1_000_003 * start + dim)
    x = F.normalize(torch.randn(stop - start, dim, generator=gen), dim=1)
    return x, F.normalize(x + 0.8 * torch.randn(stop - start, dim, generator=gen), dim=1)


def _all(n: int, dim: int):
    """All n rows in memory (what the in-memory pass holds), filled chunk by chunk (no second copy)."""
    image, text = torch.empty(n, dim), torch.empty(n, dim)
    for c in range(0, n, CHUNK):
        image[c : c + CHUNK], text[c : c + CHUNK] = rows(c, min(c + CHUNK, n), dim)
    return image, text


def _anchors(n: int, count: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(7))[:count]


def _anchor_rows(anchor: torch.Tensor, n: int, dim: int):
    """The anchors' embeddings, made from their chunks (what the ranks holding them would embed)."""
    image, text = torch.empty(anchor.numel(), dim), torch.empty(anchor.numel(), dim)
    starts = anchor - anchor % CHUNK
    for c in torch.unique(starts).tolist():  # each chunk made once
        x, y = rows(c, min(c + CHUNK, n), dim)
        mine = starts == c
        image[mine], text[mine] = x[anchor[mine] - c], y[anchor[mine] - c]
    return image, text


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _stream(n, dim, anchors, tau, batch, rank, holders):
    """This rank's part of the pass: chunks k with k % holders == rank (none if rank >= holders)."""
    anchor = _anchors(n, anchors)
    image, text = _anchor_rows(anchor, n, dim)
    stream = StreamingExact(image, text, anchor, n, tau, 1e-14, batch_of=_partition(n, batch, 3, "cpu"),
                            batch_size=batch)
    for k, c in enumerate(range(0, n, CHUNK)):
        if k % holders == rank and rank < holders:
            stop = min(c + CHUNK, n)
            stream.add(*rows(c, stop, dim), torch.arange(c, stop))
    return stream.result()


def _child(argv: list[str]) -> int:
    torch.set_num_threads(1)
    mode, out = argv[0], Path(argv[-1])
    n, dim, anchors, batch = map(int, argv[1:5])
    tau = float(argv[5])
    if mode == "equal":
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            dist.init_process_group("gloo")
        rank = dist.get_rank() if world > 1 else 0
        (a1, a2), (m1, m2) = _stream(n, dim, anchors, tau, batch, rank, min(world, 2))
        if rank == 0:
            torch.save({"alpha": (a1, a2), "minibatch": (m1, m2)}, out)
        if world > 1:
            dist.destroy_process_group()
        return 0

    def one(size):
        if mode == "streaming":
            _stream(size, dim, anchors, tau, batch, 0, 1)
        else:
            image, text = _all(size, dim)
            exact_log_normalizers(image, text, tau, 1e-14, anchors=_anchors(size, anchors), accumulate="float64")

    one(2 * CHUNK)  # warm-up: allocator pools, BLAS buffers, lazy imports are not the pass's memory
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _vm("VmRSS")
    one(n)
    out.write_text(json.dumps({"before": before, "peak": _vm("VmHWM")}))
    return 0


def _spawn(mode: str, args, n: int, out: Path, world: int = 1) -> None:
    child = ["-m", "neuclip.bench.streaming", "--child", mode, str(n), str(args.dim), str(args.anchors),
             str(args.batch), str(args.tau), str(out)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *child]
           if world > 1 else [sys.executable, *child])
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])


def run(args) -> int:
    if args.child:
        return _child(args.child)
    import tempfile


    tmp = Path(tempfile.mkdtemp(prefix="bench_streaming_"))
    image, text = _all(args.n, args.dim)
    anchor = _anchors(args.n, args.anchors)
    want = exact_log_normalizers(image, text, args.tau, 1e-14, anchors=anchor, accumulate="float64")
    want_mb = minibatch_log_normalizers(image, text, args.tau, 1e-14, args.batch, anchor,
                                        torch.Generator().manual_seed(3))
    del image, text
    equal = []
    for world in (1, 2, 3):
        _spawn("equal", args, args.n, tmp / f"equal{world}.pt", world)
        got = torch.load(tmp / f"equal{world}.pt", weights_only=True)
        diff = max(float((g - w.to(g.dtype)).abs().max()) for g, w in zip(got["alpha"], want))
        have = ~want_mb[0].isnan()
        mb = max(float((g[have] - w[have]).abs().max()) for g, w in zip(got["minibatch"], want_mb))
        same_nan = all(torch.equal(g.isnan(), w.isnan()) for g, w in zip(got["minibatch"], want_mb))
        equal.append((world, diff, mb, same_nan))
    memory = []
    for n in args.memory_n:
        for mode in ("streaming", "in-memory"):
            _spawn(mode, args, n, tmp / "mem.json")
            m = json.loads((tmp / "mem.json").read_text())
            memory.append((n, mode, m["before"], m["peak"]))
    shutil.rmtree(tmp, ignore_errors=True)
    body = _markdown(args, equal, memory)
    publish(args, "streaming", body)
    return 0


def _markdown(args, equal, memory) -> str:
    mib = 2**20
    lines = [
        "## Distributed streaming error pass (`neuclip bench streaming`)",
        "",
        f"Command: `{command_line()}`",
        f"Machine: {machine_line()}",
        "",
        f"Equality: n = {args.n} rows (d = {args.dim}, correlated unit-vector pairs), {args.anchors} anchors, "
        f"tau = {args.tau}, streamed in chunks of {CHUNK} by 1, 2 and 3 gloo processes (with 3, rank 2 holds "
        "no rows), against the one-process in-memory pass (`exact_log_normalizers`, float64 sums) and the "
        f"in-memory mini-batch estimate (batch {args.batch}, the same random partition). Max |difference| over "
        "anchors and both modalities:",
        "",
        "| processes | alpha* | mini-batch estimate | same anchors without a full batch (NaN) |",
        "|---:|---:|---:|---|",
    ]
    for world, diff, mb, same_nan in equal:
        lines.append(f"| {world} | {diff:.2e} | {mb:.2e} | {'yes' if same_nan else 'no'} |")
    lines += [
        "",
        f"Memory: one process, {args.anchors} anchors, d = {args.dim}, the streaming pass fed chunks of {CHUNK} "
        "rows (plus its 8-byte-per-row partition for the mini-batch estimate) against the in-memory pass, "
        "which holds both n x d embedding matrices. Peak resident memory above the process's memory before "
        "the pass (MiB):",
        "",
        "| n | streaming | in-memory |",
        "|---:|---:|---:|",
    ]
    by_n: dict = {}
    for n, mode, before, peak in memory:
        by_n.setdefault(n, {})[mode] = (peak - before) / mib
    for n, m in by_n.items():
        lines.append(f"| {n:,} | {m['streaming']:.0f} | {m['in-memory']:.0f} |")
    ns = sorted(by_n)
    if len(ns) == 2:
        a, b = (by_n[n] for n in ns)
        lines += ["", f"n grows {ns[1] / ns[0]:.0f}x: the streaming pass's peak goes from {a['streaming']:.0f} to "
                  f"{b['streaming']:.0f} MiB, the in-memory pass's from {a['in-memory']:.0f} to "
                  f"{b['in-memory']:.0f} MiB (each row is {2 * 4 * args.dim} bytes of embeddings; the streaming "
                  "pass keeps 8 bytes of partition per row)."]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
