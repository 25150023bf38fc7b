"""The normaliser-error study (METHOD.md §6): exact log-normalisers, estimators' estimates, their errors."""
