"""From the command line to a validated RunConfig: Hydra composition, the packaged config, the
schema and its checks, users' `_target_`s."""
