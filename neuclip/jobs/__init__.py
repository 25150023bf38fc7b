"""Jobs: the one launcher (submit, re-attach, reuse, in-process, local or SLURM through submitit), the job
kinds and the job record a folder keeps (records), following a job through requeues (waiter), and the work of
the eval, error and report stages (stages). It reads cells from neuclip/grid/ and runs the trainer and the
error study; nothing below imports it."""
