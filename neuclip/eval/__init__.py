"""Zero-shot evaluation of saved models through clip_benchmark: task registries (suites.py), eval precision
(precision.py), data layout and checks (data.py), DataComp's extra metrics (metrics.py) and the resumable suite
runner (runner.py). Nothing is imported here: the CLI reads suites.py and precision.py without paying for torch."""
