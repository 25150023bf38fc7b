"""The normaliser-error study (docs/method.md §6): exact log-normalisers, estimators' estimates, their errors."""
