"""An example user project for the launcher: classify small JPEGs of six patterns (make_images.py
writes them), read by torchvision's ImageFolder with the usual augmentations, with a small CNN of
our own. Everything here is the user's own code; the launcher reaches it through `_target_` in
conf/ (python -m launcher --config-dir conf +recipe=patterns)."""
