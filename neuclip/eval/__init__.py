"""Zero-shot evaluation of saved models through clip_benchmark: task registries (suites.py), data layout and
checks (data.py), DataComp's extra metrics (metrics.py) and the resumable suite runner (runner.py)."""

from neuclip.eval.runner import ForeignResultsError, MissingDataError, evaluate_suite
from neuclip.eval.suites import GROUPS, SUITES, TASKS

__all__ = ["evaluate_suite", "MissingDataError", "ForeignResultsError", "SUITES", "TASKS", "GROUPS"]
