"""The normaliser-error study (docs/method.md §6): exact log-normalisers, estimators' estimates, their errors."""

# What the sweep writes that the workflow tracks (workflows/error.smk), and what a lost output is rebuilt into
# (neuclip/jobs/stages.py): all of it is made from errors.json.
SWEEP_FILES = ("errors.csv", "fits.csv", "stress.csv", "stress.md", "error_vs_ratio.png", "error_over_steps.png")
