"""Which batch is worth it: the gradient noise scale and its meter, step timings, the advice,
a run's history."""
