"""The largest value each numeric key takes, with the reason: a value beyond it is no run a
machine can do (a count past float64's exact integers, a model past any memory, more threads than
any machine has cores) and is refused in one line, before anything overflows, allocates or
crashes. The smallest values are checked by each group's dataclass (its `__post_init__`).
schema.py checks every numeric field against this table; a numeric field missing here is a bug
that tests/test_bad_input.py finds. PURE.
"""

from __future__ import annotations

COUNT = 2**53  # samples, tokens: exact in float64, which the schedule's arithmetic uses
MICRO = 2**31  # a micro-batch: one tensor dimension, and a tensor's int32 index math
STEPS = 2**31  # steps, counts of steps: more than any run takes
EPOCHS = 1e9  # epochs of a data set: far more than any run trains
WIDTH = 2**16  # a built-in model's width or channels (65,536): far more than any memory holds
DEPTH = 1024  # a built-in model's layers
GIB = 2**20  # GiB of memory: a mebi-GiB, a pebibyte, more than any device or host has
RATE = 1e9  # a learning rate or a factor on one: past any that trains
WORKERS = 1024  # processes or threads on one machine: more than any machine has cores

MAXIMA: dict[str, tuple[float, str]] = {
    # top level
    "global_batch": (COUNT, "samples: float64's exact integers"),
    "global_batch_tokens": (COUNT, "tokens: float64's exact integers"),
    "micro_batch": (MICRO, "samples in one tensor"),
    "max_micro_batch": (MICRO, "samples in one tensor"),
    "seed": (2**32 - 1, "numpy's seeds"),
    "target_accuracy": (1.0, "an accuracy"),
    # model
    "model.hidden": (WIDTH, "a layer's width"),
    "model.depth": (DEPTH, "layers"),
    "model.channels": (WIDTH, "a layer's channels"),
    "model.layers": (DEPTH, "layers"),
    "model.width": (WIDTH, "a layer's width"),
    "model.heads": (WIDTH, "attention heads"),
    "model.dropout": (1.0, "a probability"),
    # data
    "data.num_samples": (10**7, "MNIST-1D samples, generated in memory at ~5,000 per second"),
    "data.train_split": (1.0, "a fraction"),
    "data.data_seed": (2**32 - 1, "numpy's seeds"),
    "data.workers": (WORKERS, "loader processes on one machine"),
    "data.prefetch_factor": (WORKERS, "batches in flight per loader process"),
    "data.train_samples": (COUNT, "samples"),
    "data.eval_samples": (COUNT, "samples"),
    "data.input_shape": (WIDTH, "one dimension of an input"),
    "data.num_classes": (2**24, "classes (16.8 million)"),
    "data.image_size": (WIDTH, "pixels"),
    "data.seq_len": (2**24, "tokens per sequence"),
    "data.pack_length": (2**24, "tokens per packed sequence"),
    "data.micro_batch_tokens": (2**40, "padded tokens per micro-batch"),
    "data.eval_fraction": (1.0, "a fraction"),
    # optim
    "optim.base_lr": (RATE, "a learning rate"),
    "optim.ref_batch": (COUNT, "samples"),
    "optim.weight_decay": (RATE, "a decay rate"),
    "optim.momentum": (1.0, "a momentum"),
    "optim.betas": (1.0, "Adam's averaging factors"),
    "optim.eps": (1.0, "Adam's epsilon"),
    "optim.trust_coefficient": (RATE, "a factor on the learning rate"),
    "optim.clip_grad_norm": (1e30, "a gradient norm"),
    "optim.large_batch.threshold": (COUNT, "samples"),
    "optim.large_batch.base_lr": (RATE, "a learning rate"),
    "optim.large_batch.weight_decay": (RATE, "a decay rate"),
    "optim.large_batch.warmup_epochs": (EPOCHS, "epochs"),
    # schedule
    "schedule.warmup_epochs": (EPOCHS, "epochs"),
    "schedule.warmup_samples": (COUNT, "samples"),
    "schedule.warmup_tokens": (COUNT, "tokens"),
    "schedule.milestones": (EPOCHS, "epochs"),
    "schedule.gamma": (RATE, "a factor on the learning rate"),
    "schedule.power": (1e3, "a polynomial's power"),
    "schedule.end_lr": (RATE, "a learning rate"),
    # backend
    "backend.zero_stage": (3, "ZeRO's stages"),
    # trainer
    "trainer.epochs": (EPOCHS, "epochs"),
    "trainer.samples": (COUNT, "samples"),
    "trainer.tokens": (COUNT, "tokens"),
    "trainer.eval_every_epochs": (EPOCHS, "epochs"),
    "trainer.log_every": (STEPS, "steps"),
    "trainer.cpu_threads": (WORKERS, "threads: more than any machine's cores"),
    "trainer.label_smoothing": (1.0, "a probability"),
    "trainer.devices": (WORKERS, "processes on one machine"),
    "trainer.noise_split_every": (STEPS, "steps"),
    "trainer.noise_window": (1.0, "a fraction of the run"),
    "trainer.nonfinite_limit": (STEPS, "steps"),
    "trainer.spike_factor": (1e30, "a factor on the loss"),
    "trainer.diverge_factor": (1e30, "a factor on the loss"),
    "trainer.stop_after_samples": (COUNT, "samples"),
    "trainer.stop_cooldown_samples": (COUNT, "samples"),
    # cluster
    "cluster.nodes": (2**20, "nodes"),
    "cluster.devices_per_node": (WORKERS, "devices on one node"),
    "cluster.device_memory_gb": (GIB, "GiB on one device"),
    # memory
    "memory.budget_gb": (GIB, "GiB on one device"),
    "memory.fraction": (1.0, "a fraction"),
    "memory.margin_gb": (GIB, "GiB on one device"),
    # checkpoint
    "checkpoint.every_samples": (COUNT, "samples"),
    "checkpoint.every_tokens": (COUNT, "tokens"),
    "checkpoint.every_minutes": (10**7, "minutes (19 years)"),
    "checkpoint.keep": (STEPS, "checkpoints"),
    # ramp
    "ramp.start_batch": (COUNT, "samples"),
    "ramp.start_batch_tokens": (COUNT, "tokens"),
    "ramp.samples": (COUNT, "samples"),
    "ramp.tokens": (COUNT, "tokens"),
    "ramp.noise_factor": (RATE, "a factor on the noise scale"),
    "ramp.min_steps": (STEPS, "steps"),
    # slurm (slurm.time is sbatch's text, minutes or HH:MM:SS: its form is checked)
    "slurm.signal_seconds": (65535, "seconds: sbatch --signal's limit"),
    "slurm.cpus_per_task": (2**16, "CPUs of one task"),
}


def maximum(key: str) -> tuple[float, str]:
    """(largest value, what it counts) of numeric key `key` (`a.b[i]`: the list `a.b`'s);
    KeyError for a key the table misses."""
    return MAXIMA[key.split("[")[0]]
