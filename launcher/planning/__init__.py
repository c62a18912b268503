"""Every derived number of a run, with its reason: the batch split, LR and warmup, ramp stages,
the schedule. Pure: no torch, no I/O. The plan itself is launcher/types/plan.py; an earlier
run's records are read in launcher/batchsize/prior.py."""
