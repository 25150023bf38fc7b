"""Helpers shared by the benchmarks: timing, the machine's matmul rate, and writing docs/benchmarks.md."""

from __future__ import annotations

import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from neuclip.atomic import write_atomic


def timeit(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_rate(m: int, k: int, n: int, device="cpu", dtype=torch.float32, repeats: int = 5) -> float:
    """Measured FLOP/s of one (m x k) @ (k x n) matmul on this machine."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)

    def run():
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()

    return 2.0 * m * k * n / timeit(run, repeats=repeats)


def machine_line() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )


def command_line() -> str:
    return "neuclip " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- bench:NAME -->` markers in docs/benchmarks.md."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_atomic(path, text)


def publish(args, name: str, body: str) -> None:
    """Print a benchmark's section and, with --write FILE, put it in that file (replacing its old one)."""
    print(body)
    if args.write:
        write_section(args.write, name, body)
