"""The launcher's Hydra config (config.yaml and its groups), shipped as package `launcher.conf`."""
