"""Normaliser estimators: one interface (`base.Estimator`), one registry (`registry`)."""

from neuclip.estimators.base import Batch, Estimator, EstimatorContext, StepOutput
from neuclip.estimators.registry import build_estimator, method_names

__all__ = ["Batch", "Estimator", "EstimatorContext", "StepOutput", "build_estimator", "method_names"]
