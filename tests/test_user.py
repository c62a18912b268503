"""A user's own model, data and loss through --config-dir and `_target_`, and launcher.run().

The project under test is written by tests/user_project.py into a temporary folder, as a user
would have it; the examples/ project is trained from the installed wheel in test_wheel.py.
Stated tolerance of the parity test: float64, 1e-10 absolute on every parameter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

import launcher
from launcher.cli import main
from launcher.config.compose import compose_run
from launcher.config.schema import to_dict, to_run_config
from launcher.errors import ConfigError
from tests.helpers import ROOT, final_state, read_metrics, run_cli, run_process, torchrun
from tests.user_project import PACKAGE, write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The user's project folder, on the Python path (as its own folder is when run from it)."""
    root = tmp_path_factory.mktemp("userproj")
    write_project(root)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.fixture
def run_here(tmp_path, monkeypatch, capsys):
    """main(argv) in an empty folder (so nothing written shows), caches outside it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    caches = [f"memory.cache_dir={tmp_path / 'cache'}"]

    def call(args: list[str]) -> tuple[int, str, str]:
        code = main([*args, *caches])
        out = capsys.readouterr()
        return code, out.out, out.err

    call.work = work
    return call


# ----------------------------------------------------------------------------- composition
def test_help_lists_the_users_recipes_and_group_options(project, capsys):
    assert main(["--help", "--config-dir", str(project / "conf")]) == 0
    out = capsys.readouterr().out
    assert "cifar10, gpt_small, mnist1d, resnet50, resnet50_lars, tiny" in out
    assert "model=branchy|broken|cnn1d|gpt|huge|mlp|not_module|resnet50|scalar|tiny;" in out
    assert "data=cifar10|imagefolder|mnist1d|points|synthetic|text;" in out
    assert "loss=cross_entropy|mean|per_sample|squared;" in out
    assert main(["--help"]) == 0
    assert "tiny" not in capsys.readouterr().out


def test_targets_compose_validate_and_round_trip(project):
    cfg = compose_run(["+recipe=tiny", "model.features=6", "loss=per_sample"], project / "conf")
    assert (cfg.model.target, cfg.model.kwargs) == (
        f"{PACKAGE}.parts.make_model",
        {
            "features": 6,
            "classes": 3,
        },
    )
    assert cfg.data.kwargs == {"features": 6, "form": "dict"} and cfg.data.workers == 0
    assert cfg.loss.kwargs == {"_partial_": True}
    plain = to_dict(cfg)
    assert plain["model"] == {
        "_target_": f"{PACKAGE}.parts.make_model",
        "features": 6,
        "classes": 3,
        "activation_checkpointing": False,
        "checkpoint_blocks": [],
    }
    assert to_run_config(plain) == cfg  # config.yaml composes back to the same run
    assert cfg.global_batch == 64 and cfg.recipe == "tiny"  # the recipe is global without header


BAD: list[tuple[list[str], str | tuple[str, ...]]] = [
    (
        ["+recipe=nope"],
        "recipe='nope': unknown; choose from cifar10, gpt_small, mnist1d, "
        "resnet50, resnet50_lars, tiny",
    ),
    (["+recipe=tiny", "model=cnn1d"], "model='cnn1d': both the launcher and "),
    (
        ["+recipe=tiny", "model._target_=nopkg.models.build"],
        "model._target_='nopkg.models.build': no module named 'nopkg' on the Python path",
    ),
    (
        ["+recipe=tiny", f"model._target_={PACKAGE}.parts.nothing"],
        f"model._target_='{PACKAGE}.parts.nothing': {PACKAGE}.parts has no attribute 'nothing'",
    ),
    (
        ["+recipe=tiny", f"model._target_={PACKAGE}.importfails.build"],
        f"importing {PACKAGE}.importfails raised RuntimeError: boom while importing",
    ),
    (["+recipe=tiny", "model._target_=not a path"], "must be the import path of a callable"),
    (
        ["+recipe=tiny", "+model.depth=3"],
        "model.depth=3: not a keyword argument of tinyproj.parts.make_model(features: int = 6, "
        "classes: int = 3) -> torch.nn.modules.module.Module",
    ),
    (
        ["+recipe=tiny", "model=broken"],
        f"model._target_='{PACKAGE}.parts.broken_model' raised FileNotFoundError: no weights at "
        "/nowhere/tiny.pt",
    ),
    (["+recipe=tiny", "model=not_module"], "returned a list, not a torch.nn.Module"),
    (
        ["+recipe=tiny", "data.form=iterable"],
        "its train data is an iterator (iterator), which can be read once; return an iterable "
        "whose iter() starts over (an IterableDataset)",
    ),
    (["+recipe=tiny", "data.form=triple"], "returned a tuple of 3 items; expected (train, eval)"),
    (["+recipe=tiny", "data.form=unpaired"], "train[0] is a Tensor; items must be (input, target)"),
    (["+recipe=tiny", "data.form=empty"], "its train data is empty"),
    (["+recipe=tiny", "data.form=bogus"], "raised ValueError: unknown form 'bogus'"),
    (
        ["+recipe=tiny", "loss=mean"],
        f"loss {PACKAGE}.parts.mean_loss returned () for 2 samples; it must return one loss per "
        "sample, shape (2,)",
    ),
    (
        ["+recipe=tiny", "+data.target_len=4"],
        f"model._target_='{PACKAGE}.parts.make_model' with "
        f"data._target_='{PACKAGE}.parts.make_data': outputs (2, 3) do not fit targets (2, 4): "
        "cross-entropy needs outputs of the targets' shape + (classes,)",
    ),
    (
        ["+recipe=tiny", "data.features=5"],
        (
            "model._target_='tinyproj.parts.make_model' with "
            "data._target_='tinyproj.parts.make_data': RuntimeError: ",
            "(on inputs (2, 5) torch.float32)\n",
        ),
    ),
    (
        ["+recipe=tiny", "loss=per_sample", "trainer.label_smoothing=0.1"],
        "trainer.label_smoothing=0.1: applies to the built-in cross-entropy only",
    ),
    (
        ["+recipe=tiny", "model.activation_checkpointing=true"],
        "a model of your own needs model.checkpoint_blocks",
    ),
    (
        ["+recipe=tiny", "model.activation_checkpointing=true", "model.checkpoint_blocks=[Nope]"],
        "model.checkpoint_blocks=['Nope']: no submodule has these classes; the model's are "
        "Flatten, Linear, Sequential, Tanh, Tiny",
    ),
    (["--config-dir=/no/such/folder"], "--config-dir='/no/such/folder': not a folder"),
    (  # a head with fewer outputs than the data's classes: declared ...
        ["+recipe=tiny", "+data.classes=4"],
        "the model gives 3 class scores per sample, but the data has at least 4 classes (it "
        "declares 4 classes); give the model's output layer 4 or more outputs",
    ),
    (  # ... or read: eval[0]'s target is 8 (a pair declares no num_classes)
        ["+recipe=tiny", "+data.classes=10", "data.form=pair"],
        "the model gives 3 class scores per sample, but the data has at least 9 classes (a "
        "target of 8 in its first samples)",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
@pytest.mark.parametrize("plan_only", [True, False], ids=["plan_only", "run"])
def test_bad_user_input_is_one_line_exit_2_nothing_written(
    project, run_here, args, message, plan_only
):
    """Refused before anything is written, by the plan (fake tensors) and by a real run alike."""
    if not args[0].startswith("--config-dir"):
        args = ["--config-dir", str(project / "conf"), *args]
    code, out, err = run_here([*args, f"plan_only={str(plan_only).lower()}"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("launcher: error: "), err
    for part in (message,) if isinstance(message, str) else message:
        assert part in err, err
    assert list(run_here.work.iterdir()) == []


def test_a_search_needs_an_objective_the_model_gives(project, run_here):
    """A regression head has no accuracy: searching for it is refused before anything runs (a
    forward on fake tensors shows it); its eval loss is a search's objective."""
    args = ["--config-dir", str(project / "conf"), "+recipe=tiny", "model=scalar", "loss=squared"]
    search = ["-m", "hydra/sweeper=optuna", "optim.base_lr=interval(0.01,0.1)"]
    code, _, err = run_here([*search, *args])
    assert code == 2 and err.count("\n") == 1, err
    assert "objective=eval_accuracy: this model's outputs are not class scores" in err
    assert list(run_here.work.iterdir()) == []
    one = ["objective=eval_loss", "hydra.sweeper.n_trials=1", "hydra.sweep.dir=sw"]
    code, out, err = run_here([*search, *args, *one])
    assert code == 0, err
    results = yaml.safe_load((run_here.work / "sw" / "optimization_results.yaml").read_text())
    evals = [r for r in read_metrics(run_here.work / "sw" / "0") if "eval_loss" in r]
    assert results["best_value"] == evals[-1]["eval_loss"] and "eval_accuracy" not in evals[-1]


def test_a_model_too_large_to_build_is_one_line(project, run_here):
    """A model the meta device cannot count (made through numpy, so the memory pre-check passes it
    by) whose weights do not fit in host memory: its factory's allocation error is one line."""
    args = ["--config-dir", str(project / "conf"), "+recipe=tiny", "model=huge"]
    code, out, err = run_here(args)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"launcher: error: model._target_='{PACKAGE}.parts.huge_model' raised ")
    assert "can't allocate memory" in err
    assert list(run_here.work.iterdir()) == []


def test_builtin_model_on_data_it_cannot_take_is_one_line(run_here):
    """The issue's `model=mlp data=text`: a 41-line traceback before, one line now."""
    code, _, err = run_here(["model=mlp", "data=text", "plan_only=true"])
    assert code == 2 and err.count("\n") == 1, err
    assert err == (
        "launcher: error: model='mlp' with data='text': outputs (2, 256) do not fit targets "
        "(2, 256): cross-entropy needs outputs of the targets' shape + (classes,)\n"
    )


def test_a_model_fake_tensors_cannot_trace_is_said_not_skipped(project, run_here):
    """plan_only estimates and checks with fake tensors; a model with data-dependent control flow
    stops the estimate with one line naming the way out, a plan without it gets a note, and the
    real run (real tensors) checks and trains."""
    args = ["--config-dir", str(project / "conf"), "+recipe=tiny", "model=branchy"]
    code, _, err = run_here([*args, "plan_only=true"])
    assert code == 2 and err.count("\n") == 1, err
    assert (
        "plan_only: the memory estimate cannot trace model._target_='tinyproj.parts.Branchy'" in err
    )
    assert err.rstrip().endswith("plan without it: micro_batch=N or memory.probe=false")
    code, _, err = run_here([*args, "plan_only=true", "micro_batch=32", "run_dir=plan"])
    assert code == 0 and err.count("\n") == 1, err
    assert err.startswith("launcher: note: plan_only could not check that model._target_=")
    code, out, err = run_here([*args, "run_dir=run", "trainer.noise_scale=false"])
    assert code == 0, err
    assert "test accuracy" in out


def test_a_clashing_recipe_name_is_refused(tmp_path, run_here):
    conf = tmp_path / "conf"
    (conf / "recipe").mkdir(parents=True)
    (conf / "recipe" / "mnist1d.yaml").write_text("global_batch: 32\n")
    code, _, err = run_here(["--config-dir", str(conf), "plan_only=true"])
    assert code == 2 and "recipe='mnist1d': both the launcher and" in err, err
    (conf / "config.yaml").write_text("x: 1\n")
    code, _, err = run_here(["--config-dir", str(conf), "plan_only=true"])
    assert code == 2 and "holds config.yaml, which the launcher's own primary config" in err


# --------------------------------------------------------------------------------- planning
def test_plan_takes_shapes_from_the_data_and_records_the_targets(project, run_here):
    """plan_only builds the data (epoch size, first sample), estimates with fake tensors from
    that sample, and config.yaml records the `_target_`s; a wider input costs more per sample."""
    per_sample = {}
    for features in (6, 600):
        args = ["--config-dir", str(project / "conf"), "+recipe=tiny", "plan_only=true"]
        args += [f"data.features={features}", f"model.features={features}", f"run_dir=p{features}"]
        code, out, err = run_here(args)
        assert code == 0, err
        plan = json.loads((run_here.work / f"p{features}" / "plan.json").read_text())
        assert plan["epoch_samples"] == 640 and plan["memory"]["source"] == "estimated"
        per_sample[features] = max(line[1] for line in plan["memory"]["lines"])
        config = yaml.safe_load((run_here.work / f"p{features}" / "config.yaml").read_text())
        assert config["model"]["_target_"] == f"{PACKAGE}.parts.make_model"
        assert config["data"]["_target_"] == f"{PACKAGE}.parts.make_data"
        assert config["data"]["features"] == features
    # 594 more float32 inputs per sample (and their gradient-free copies): at least 2 kB more
    assert per_sample[600] - per_sample[6] >= 594 * 4, per_sample


def test_activation_checkpointing_recomputes_the_named_blocks(project):
    """examples/waves's ConvBlock (with BatchNorm): the same loss, gradients and running
    statistics as without, in float64; the estimate needs less memory per sample."""
    sys.path.insert(0, str(ROOT / "examples" / "waves"))
    try:
        from launcher.data import data_spec
        from launcher.models import build_model
        from launcher.models.loss import CrossEntropy

        conf = ROOT / "examples" / "waves" / "conf"
        plain = compose_run(["+recipe=waves"], conf)
        ckpt = compose_run(["+recipe=waves", "model.activation_checkpointing=true"], conf)
        spec = data_spec(plain.data)
        x = torch.randn(8, *spec.input_shape, dtype=torch.float64)
        y = torch.randint(4, (8,))
        results = []
        for cfg in (plain, ckpt):
            torch.manual_seed(0)
            model = build_model(cfg.model, spec).double()
            CrossEntropy().sum(model(x), y).backward()
            results.append((model, [p.grad for p in model.parameters()]))
        (a, grads_a), (b, grads_b) = results
        assert a.state_dict().keys() == b.state_dict().keys()  # checkpoints stay interchangeable
        assert sum("CheckpointWrapper" in type(m).__name__ for m in b.modules()) == 3
        for g, h in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-14)
        for (name, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0, msg=name)  # BN stats: one update
    finally:
        sys.path.remove(str(ROOT / "examples" / "waves"))


# ------------------------------------------------------------------------------- launcher.run
def test_run_from_python_trains_the_instance_in_place(project, tmp_path, monkeypatch):
    """launcher.run with objects: the plan and loop as from the command line; the instance is
    trained in place (its weights are model_final.pt); config.yaml says what it was given."""
    monkeypatch.chdir(tmp_path)
    from tinyproj.parts import Tiny, make_data, per_sample

    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = ["+recipe=tiny", "run_dir=api", f"memory.cache_dir={tmp_path / 'cache'}"]
    result = launcher.run(
        args, config_dir=project / "conf", model=model, data=make_data(), loss=per_sample
    )
    assert result["run_dir"] == "api" and result["eval_accuracy"] > 0.9, result
    saved = final_state(tmp_path / "api")
    for name, value in model.state_dict().items():
        assert not torch.equal(value, before[name]) and torch.equal(value, saved[name]), name
    config = yaml.safe_load((tmp_path / "api" / "config.yaml").read_text())
    assert config["model"] == {
        "_target_": "launcher.api.provided",
        "part": "model",
        "described": f"{PACKAGE}.parts.Tiny instance",
        "activation_checkpointing": False,
        "checkpoint_blocks": [],
    }
    assert config["loss"]["described"] == f"{PACKAGE}.parts.per_sample"


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            ["trainer.devices=2"],
            {},
            "trainer.devices=2: would start 2 workers as `python -m "
            "launcher`, which cannot rebuild the model, data handed to launcher.run(); start your "
            "script on every rank instead (torchrun --nproc_per_node 2 your_script.py)",
        ),
        (
            ["model.features=4"],
            {},
            "'model.features=4': the model was handed to launcher.run() "
            "as a Python object; configure it in your script",
        ),
        (["global_batch=32,64"], {"multirun": True}, "multirun: one model instance cannot start"),
    ],
)
def test_run_from_python_refuses_what_workers_could_not_rebuild(
    project, tmp_path, monkeypatch, args, kwargs, message
):
    monkeypatch.chdir(tmp_path)
    from tinyproj.parts import Tiny, make_data

    with pytest.raises(ConfigError) as err:
        launcher.run(
            ["+recipe=tiny", *args],
            config_dir=project / "conf",
            model=Tiny(),
            data=make_data,
            **kwargs,
        )
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- real processes
def _env(project: Path) -> dict[str, str]:
    from tests.helpers import launcher_env

    return {"PYTHONPATH": f"{project}:{launcher_env()['PYTHONPATH']}"}


@pytest.mark.slow
def test_two_ranks_train_the_users_model_as_one_does(project, tmp_path):
    """trainer.devices=2 workers rebuild the user's model and data from the config dir (each rank
    its own, from the seeded factory) and end where one process ends: float64, 1e-10."""
    common = ["--config-dir", str(project / "conf"), "+recipe=tiny", "trainer.dtype=float64"]
    common += ["+data.shuffle_seed=1", "trainer.noise_scale=false"]
    one = run_process(
        [sys.executable, "-m", "launcher", *common, "micro_batch=32", "run_dir=one"],
        tmp_path,
        env=_env(project),
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_process(
        [sys.executable, "-m", "launcher", *common, "trainer.devices=2", "run_dir=two"],
        tmp_path,
        env=_env(project),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert '"world_size": 2' in (tmp_path / "two" / "plan.json").read_text()
    ref, got = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=1e-10, rtol=0, msg=name)


SCRIPT = """
import sys
import launcher
from tinyproj.parts import Tiny, make_data, per_sample

result = launcher.run(sys.argv[1:], config_dir="conf", model=Tiny, data=make_data(),
                      loss=per_sample)
print("RESULT", result["eval_accuracy"], result["run_dir"])
"""


@pytest.mark.slow
def test_a_users_script_under_torchrun_hands_every_rank_its_objects(project, tmp_path):
    (project / "train_script.py").write_text(SCRIPT)
    res = run_process(
        [
            sys.executable,
            *torchrun(),
            "train_script.py",
            "+recipe=tiny",
            f"run_dir={tmp_path / 'run'}",
            f"memory.cache_dir={tmp_path / 'cache'}",
        ],
        project,
        env=_env(project),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("RESULT") == 2  # both ranks return the (same) final evaluation
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["world_size"] == 2
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["model"]["described"] == f"{PACKAGE}.parts.Tiny"  # a factory: the class
    assert float(res.stdout.split("RESULT")[1].split()[0]) > 0.9


@pytest.mark.slow
def test_run_cli_uses_the_same_flags_as_hydra(project, tmp_path):
    """-cd DIR and --config-dir=DIR are Hydra's spellings too (a real process: nothing cached)."""
    res = run_cli(["-cd", str(project / "conf"), "--help"], tmp_path)
    assert res.returncode == 0 and "tiny" in res.stdout
    res = run_cli([f"--config-dir={project / 'conf'}", "--help"], tmp_path)
    assert res.returncode == 0 and "tiny" in res.stdout


def test_each_run_from_python_uses_its_own_data(project, tmp_path, monkeypatch):
    """Two calls in one script with data objects of the same type: the second plan counts the
    second data (the process's built-data cache is not keyed by object)."""
    monkeypatch.chdir(tmp_path)
    from tinyproj.parts import Tiny, make_data

    for n in (640, 320):
        args = ["+recipe=tiny", "plan_only=true", f"run_dir=n{n}"]
        args.append(f"memory.cache_dir={tmp_path / 'cache'}")
        launcher.run(args, config_dir=project / "conf", model=Tiny, data=make_data(n=n))
        plan = json.loads((tmp_path / f"n{n}" / "plan.json").read_text())
        assert plan["epoch_samples"] == n
