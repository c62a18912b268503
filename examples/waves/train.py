"""Train the example from a script of your own: launcher.run() with the project's objects.

    python train.py                                   # one process
    torchrun --nproc_per_node 2 train.py              # every rank runs this script
    python train.py global_batch=512 trainer.epochs=3 # overrides, as on the command line

The recipe comes from this project's config dir; the model, data and loss are Python objects here
and replace those groups. The model instance is trained in place.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from waves.data import make_waves
from waves.model import WaveNet

import launcher


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One loss per sample: the launcher sums them and divides by the global batch."""
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


if __name__ == "__main__":
    torch.manual_seed(0)
    model = WaveNet(channels=32, depth=3, classes=4)
    result = launcher.run(
        ["+recipe=waves", *sys.argv[1:]],
        config_dir=Path(__file__).parent / "conf",
        model=model,
        data=make_waves(),
        loss=per_sample_loss,
    )
    print(f"accuracy {result['eval_accuracy']:.4f}; run in {result['run_dir']}")
