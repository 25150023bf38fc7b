"""The grid: an experiment config, its schema and validation, its cells and their train configs (workflow),
shrinking it for a rehearsal, the start-up checks every cell passes before anything is queued (preflight,
cluster_fit), and the experiment as the Snakefile and `neuclip plan` load it. Nothing here starts a job:
that is neuclip/jobs/."""
