"""launcher: a batch-size-aware distributed training launcher for PyTorch."""

__version__ = "0.1.0"
