"""Every derived number of a run, with its reason: the batch split, LR and warmup, ramp stages,
the schedule. Pure: no torch, no I/O beyond reading an earlier run's records (prior.py)."""
