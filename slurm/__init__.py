"""The sbatch templates `python -m launcher.slurm` renders (package `launcher.slurm_templates`)."""
