"""Where the processes are: topology from the environment, local workers, Slurm scripts,
preemption."""
