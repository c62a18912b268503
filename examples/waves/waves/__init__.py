"""An example user project for the launcher: classify noisy waveforms (sine, square, pulse,
sawtooth) with a small 1-D CNN. Everything here is the user's own code; the launcher reaches it
through `_target_` in conf/ (python -m launcher --config-dir conf +recipe=waves) or through
launcher.run() (train.py)."""
