"""``c2f plan``: per-GPU memory of every role of a job, counted on the meta device (see ``report``)."""
