"""Baseline normaliser estimators, one per file, each behind neuclip.estimators.base.Estimator."""
