"""`neuclip bench TARGET`: measurements (not tests). Each target is `neuclip/bench/<target>.py` with
`add_arguments(parser)` and `run(args) -> int`; results go to docs/benchmarks.md with the command used."""

from __future__ import annotations

import importlib

TARGETS = {
    "estimators": "per-step cost of each estimator at paper-like shapes, NeuCLIP's inner block vs matmul rate",
    "trainer": "our trainer's samples/s vs open_clip_train on the same tiny model; NeuCLIP vs OpenCLIP step",
    "exact": "the exact-normaliser pass: throughput vs matmul rate, peak memory against n",
    "loader": "training loader samples/s per core vs open_clip's webdataset pipeline; resume cost by position",
    "state": "per-sample state at large data_size: memory and checkpoint per rank, 1 vs N ranks, resume",
    "streaming": "the distributed streaming error pass: 1, 2, 3 ranks against one process, memory as n grows",
    "npn": "NeuCLIP's NPN block replicated vs sharded: FLOP account at paper shapes, time per rank, tf32/bf16",
    "startup": "process start to first batch at up to 1e8 samples, extrapolated to DFN-1B; index scan rate",
}


def register(sub) -> None:
    parser = sub.add_parser("bench", help="run a benchmark", description=__doc__)
    targets = parser.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    for name, help_text in TARGETS.items():
        try:
            module = importlib.import_module(f"neuclip.bench.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"neuclip.bench.{name}":
                continue  # benchmark not built yet
            raise
        p = targets.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
