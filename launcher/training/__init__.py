"""One job, from its plan to its outputs: the job's phases, the loop, step health, the loss,
metrics, and what a job returns to a sweeper."""
