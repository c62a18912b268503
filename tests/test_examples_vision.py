"""examples/vision as a user has it: the project copied out of the repo, its JPEGs written by its
own make_images.py, trained by the installed wheel (fixture `wheel_python`, conftest.py) with no
path into this checkout, on 1 process and on 2 (trainer.devices=2).

The data is a torchvision ImageFolder read by DataLoader workers (data.workers=2) with random
crops and flips. Six classes, so chance is 1/6 (16.7%); the stated bar is 80%. Measured with the
recipe's 15 epochs over seeds 0-2 (examples/vision/README.md): 90.8-97.5% on 1 process,
91.7-95.8% on 2; the tests run seed 0 (97.5% and 95.8%).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, read_metrics, wheel_env

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "vision"
ACCURACY = 0.80
TRAIN_IMAGES, VAL_IMAGES = 6 * 60, 6 * 20  # make_images.py's defaults: 6 classes, 60 and 20 each


def run(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python ARGS` in `cwd` with the wheel's environment."""
    return subprocess.run(
        [str(python), *args], cwd=cwd, env=wheel_env(), capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def project(tmp_path, wheel_python) -> Path:
    """examples/vision copied outside the repository, with its images written into data/."""
    folder = Path(shutil.copytree(EXAMPLE, tmp_path / "vision"))
    made = run(wheel_python, ["make_images.py", "data"], folder)
    assert made.returncode == 0, made.stderr
    assert made.stdout == f"wrote {TRAIN_IMAGES + VAL_IMAGES} images of 6 classes under data\n"
    assert len(list((folder / "data" / "val").glob("*/*.jpg"))) == VAL_IMAGES
    return folder


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_vision_example_learns_its_jpegs_from_the_wheel(wheel_python, project, ranks):
    args = ["-m", "launcher", "--config-dir", "conf", "+recipe=patterns", "run_dir=run"]
    args += ["trainer.progress=false", *(["trainer.devices=2"] if ranks == 2 else [])]
    res = run(wheel_python, args, project)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads((project / "run" / "plan.json").read_text())
    assert (plan["world_size"], plan["epoch_samples"]) == (ranks, TRAIN_IMAGES)
    config = yaml.safe_load((project / "run" / "config.yaml").read_text())
    assert config["model"]["_target_"] == "patterns.model.SmallCNN"
    assert config["data"]["_target_"] == "patterns.data.make_imagefolder"
    assert config["data"]["workers"] == 2
    final = [m for m in read_metrics(project / "run") if "eval_accuracy" in m][-1]
    assert final["eval_samples"] == VAL_IMAGES  # every image once, over all ranks together
    assert final["eval_accuracy"] >= ACCURACY, final
