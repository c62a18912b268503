"""Bad input, table-driven, across every config group (issue 20): each override alone is one
line on stderr naming its key, exit 2, and nothing written. The plan checks most of them
(plan_only, in process); the rest need the real run's checks (folders, checkpoints), which all
come before anything is written."""

from __future__ import annotations

import pytest

from tests.helpers import refused_in_process

PLANNED = [
    ("global_batch=0", "global_batch"),
    ("global_batch=-1", "global_batch"),
    ("global_batch=1.5", "global_batch"),
    ("global_batch=1000000000000", "global_batch"),
    ("micro_batch=0", "micro_batch"),
    ("micro_batch=-3", "micro_batch"),
    ("micro_batch=7", "micro_batch"),
    ("max_micro_batch=0", "max_micro_batch"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
    ("target_accuracy=1.5", "target_accuracy"),
    ("target_accuracy=0", "target_accuracy"),
    ("objective=nope", "objective"),
    ("run_dir=", "run_dir"),
    ("plan_only=maybe", "plan_only"),
    ("plan_only='maybe'", "plan_only"),  # a string converts as OmegaConf's (yes, on, 1: true)
    ("trainer.epochs='three'", "trainer.epochs"),
    ("optim.base_lr='nan'", "optim.base_lr"),
    ("foo=1", "foo"),
    ("model=nosuch", "model"),
    ("model.hidden=0", "model.hidden"),
    ("model.depth=-1", "model.depth"),
    ("data=nosuch", "data"),
    ("data.num_samples=105", "data.num_samples"),
    ("data.num_samples=50", "data.num_samples"),
    ("data.train_split=1.0", "data.train_split"),
    ("data.train_split=0", "data.train_split"),
    ("data.data_seed=-1", "data.data_seed"),
    ("data.cache_dir=/proc/x", "data.cache_dir"),
    ("loss=nosuch", "loss"),
    ("optim=nosuch", "optim"),
    ("optim.base_lr=inf", "optim.base_lr"),
    ("optim.base_lr=nan", "optim.base_lr"),
    ("optim.base_lr=-1", "optim.base_lr"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm"),
    ("optim.scaling=cube", "optim.scaling"),
    ("optim.ref_batch=0", "optim.ref_batch"),
    ("optim.momentum=2", "optim.momentum"),
    ("schedule=nosuch", "schedule"),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs"),
    ("schedule.decay=zigzag", "schedule.decay"),
    ("backend=nosuch", "backend"),
    ("backend.mixed_precision=fp8", "backend.mixed_precision"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.epochs=inf", "trainer.epochs"),
    ("trainer.epochs=-1", "trainer.epochs"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.eval_every_epochs=0", "trainer.eval_every_epochs"),
    ("trainer.eval_every_epochs=1e-9", "trainer.eval_every_epochs"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.nonfinite_limit=0", "trainer.nonfinite_limit"),
    ("trainer.spike_factor=-1", "trainer.spike_factor"),
    ("trainer.stop_after_samples=-1", "trainer.stop_after_samples"),
    ("trainer.dtype=float8", "trainer.dtype"),
    ("trainer.cpu_threads=-1", "trainer.cpu_threads"),
    ("trainer.noise_window=0", "trainer.noise_window"),
    ("cluster=nosuch", "cluster"),
    ("cluster.nodes=0", "cluster.nodes"),
    ("cluster.devices_per_node=-1", "cluster.devices_per_node"),
    ("cluster.device=tpu", "cluster.device"),
    ("cluster.device_memory_gb=0", "cluster.device_memory_gb"),
    ("memory.budget_gb=0", "memory.budget_gb"),
    ("memory.fraction=0", "memory.fraction"),
    ("memory.fraction=1.5", "memory.fraction"),
    ("memory.margin_gb=-1", "memory.margin_gb"),
    ("memory.cache=sometimes", "memory.cache"),
    ("checkpoint.every_samples=-1", "checkpoint.every_samples"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.every_minutes=-1", "checkpoint.every_minutes"),
    ("ramp.mode=sideways", "ramp.mode"),
    ("ramp.start_batch=0", "ramp.start_batch"),
    ("ramp.noise_factor=0", "ramp.noise_factor"),
    ("ramp.min_steps=0", "ramp.min_steps"),
    ("global_batch_tokens=0", "global_batch_tokens"),
    ("global_batch_tokens=4096", "global_batch_tokens"),  # mnist1d: no tokens
    ("schedule.warmup_tokens=-1", "schedule.warmup_tokens"),
    ("schedule.warmup_samples=-1", "schedule.warmup_samples"),
    ("trainer.tokens=-1", "trainer.tokens"),
    ("trainer.tokens=4096", "trainer.tokens"),
    ("trainer.samples=-1", "trainer.samples"),
    ("ramp.tokens=-1", "ramp.tokens"),
    ("ramp.start_batch_tokens=0", "ramp.start_batch_tokens"),
    ("checkpoint.every_tokens=-1", "checkpoint.every_tokens"),
    ("checkpoint.every_tokens=4096", "checkpoint.every_tokens"),
    ("slurm.time=abc", "slurm.time"),
    ("slurm.signal_seconds=-1", "slurm.signal_seconds"),
    ("slurm.partition=a b", "slurm.partition"),
    ("slurm.mem=lots", "slurm.mem"),
    ("slurm.cpus_per_task=0", "slurm.cpus_per_task"),
    ("hydra.foo=1", "hydra.foo"),
    ("hydra.run.dir=", "hydra.run.dir"),
    # numbers no run can use (issue 30): each key's maximum, config/ranges.py
    ("trainer.epochs=1e308", "trainer.epochs=1e+308: must be <= 1e+09 (epochs)"),
    ("schedule.warmup_epochs=1e308", "schedule.warmup_epochs=1e+308: must be <= 1e+09"),
    ("trainer.eval_every_epochs=1e308", "trainer.eval_every_epochs=1e+308: must be <= 1e+09"),
    ("trainer.epochs=1" + "0" * 400, "trainer.epochs=1000"),  # past float: must be finite
    ("trainer.cpu_threads=100000", "trainer.cpu_threads=100000: must be <= 1,024"),
    ("model.channels=10000000", "model.channels=10000000: must be <= 65,536"),
    ("trainer.samples=" + "1" + "0" * 30, "trainer.samples=1" + "0" * 30 + ": must be <= 9,007"),
    ("checkpoint.every_samples=" + "1" + "0" * 24, "checkpoint.every_samples=1" + "0" * 24),
    ("max_micro_batch=" + "1" + "0" * 21, "max_micro_batch=1" + "0" * 21 + ": must be <= 2,147"),
    ("trainer.log_every=" + "1" + "0" * 21, "trainer.log_every=1" + "0" * 21 + ": must be <="),
    ("data.num_samples=1000000000000", "data.num_samples=1000000000000: must be <= 10,000,000"),
    ("optim.base_lr=1e307", "optim.base_lr=1e+307: must be <= 1e+09 (a learning rate)"),
    ("memory.margin_gb=1e300", "memory.margin_gb=1e+300: must be <="),
]
IN_TOKENS = [  # sequence data (+recipe=gpt_small, 256 tokens per sequence): what does not convert
    ("global_batch_tokens=1000", "global_batch_tokens=1000: 3.90625, not a whole number"),
    ("global_batch_tokens=1000000000", "global_batch_tokens=1000000000 (3,906,250 sequences)"),
    ("schedule.warmup_tokens=100", "schedule.warmup_tokens=100: 0.390625, not a whole"),
    ("trainer.tokens=1000", "trainer.tokens=1000: 3.90625, not a whole number"),
    ("ramp.tokens=1000", "ramp.tokens=1000: 3.90625, not a whole number"),
    ("checkpoint.every_tokens=1000", "checkpoint.every_tokens=1000: 3.90625, not a whole"),
    ("trainer.samples=1", "global_batch=64: larger than the whole run (1 samples = trainer.sam"),
    (  # both stated, disagreeing (issue 30: it trained at the tokens' 256 silently)
        "global_batch_tokens=65536 global_batch=100",
        "global_batch_tokens=65536 and global_batch=100: both set, and 65,536 tokens are 256",
    ),
    (  # a ramp stage that does not split is named by the key in tokens the user wrote
        "ramp.start_batch_tokens=256 ramp.tokens=65536 micro_batch=2",
        "ramp.start_batch_tokens=256: the stage at global batch 1: micro_batch=2",
    ),
]
RUN = [  # refused by a real run, still before it writes anything
    ("resume=/no/such/file.pt", "resume='/no/such/file.pt': no usable checkpoint there"),
    ("memory.cache_dir=/proc/x", "memory.cache_dir='/proc/x': cannot write there"),
    ("run_dir=/proc/x", "run_dir='/proc/x': cannot write there"),
    ("run_dir=" + "a" * 300, "cannot write there (File name too long)"),
    ("data.num_samples=100", "global_batch=512: larger than the whole run"),
    (  # before the model is built: 4.5 billion weights, 3x with gradients and momentum
        "model.channels=30000",
        "memory: model='cnn1d' with data='mnist1d' does not fit even at micro-batch 1: it needs "
        "at least 60.4 GiB on cpu (weights, gradients and sgd's state), more than the budget of",
    ),
]


def test_the_table_covers_every_group() -> None:
    groups = {key.split(".")[0] for _, key in PLANNED}
    assert len(PLANNED) + len(RUN) >= 60
    assert groups >= {"model", "data", "loss", "optim", "schedule", "backend", "trainer"}
    assert groups >= {"cluster", "memory", "checkpoint", "ramp", "slurm", "hydra", "seed"}


@pytest.mark.parametrize(("override", "key"), PLANNED, ids=[o for o, _ in PLANNED])
def test_a_bad_value_is_one_line_naming_its_key(override, key, tmp_path, monkeypatch, capsys):
    args = ["plan_only=true", "memory.probe=false", override]
    assert key in refused_in_process(args, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(("override", "message"), IN_TOKENS, ids=[o for o, _ in IN_TOKENS])
def test_what_tokens_cannot_say_is_one_line(override, message, tmp_path, monkeypatch, capsys):
    args = ["+recipe=gpt_small", "plan_only=true", "memory.probe=false", *override.split()]
    assert message in refused_in_process(args, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(("override", "message"), RUN, ids=[o[:40] for o, _ in RUN])
def test_a_real_run_refuses_before_writing(override, message, tmp_path, monkeypatch, capsys):
    args = ["trainer.epochs=0.05", "trainer.progress=false", override]
    assert message in refused_in_process(args, tmp_path, monkeypatch, capsys)


SHOWN = {"cfg": ["--cfg", "job"], "info": ["--info"], "slurm": []}  # besides a run
BROKEN = {  # files of a --config-dir that does not compose: the option that reads them, the line
    "syntax": (
        {"recipe/syntax.yaml": "global_batch: 64\ntrainer: {epochs: 1\n"},
        "+recipe=syntax",
        "recipe/syntax.yaml, line 3, column 1: not valid YAML: expected ',' or '}', but got "
        "'<stream end>' (while parsing a flow mapping at line 2, column 10)",
    ),
    "loop": (
        {"recipe/loop.yaml": "defaults:\n  - /recipe/loop\n"},
        "+recipe=loop",
        "circular defaults: recipe/loop.yaml -> recipe/loop.yaml (a defaults list includes",
    ),
    "cycle": (
        {"model/a.yaml": "defaults:\n  - /model/b\n", "model/b.yaml": "defaults:\n  - /model/a\n"},
        "model=a",
        "circular defaults: model/a.yaml -> model/b.yaml -> model/a.yaml",
    ),
    "latin": ({"recipe/latin.yaml": "é"}, "+recipe=latin", "latin.yaml: not UTF-8 text"),
    "twice": (
        {"recipe/twice.yaml": "seed: 1\nseed: 2\n"},
        "+recipe=twice",
        "twice.yaml, line 2, column 1: not valid YAML: found duplicate key seed",
    ),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    for files, _, _ in BROKEN.values():
        for name, text in files.items():
            (folder / name).parent.mkdir(exist_ok=True)
            data = text.encode("latin-1") if "latin" in name else text.encode()
            (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    ("case", "how"),
    [(case, "run") for case in BROKEN] + [(c, h) for c in ("syntax", "loop") for h in SHOWN],
)
def test_a_config_folder_that_does_not_compose_is_one_line(
    case, how, broken, tmp_path, monkeypatch, capsys
):
    """A YAML error or a defaults list that includes itself: one line naming the file (and the
    line), exit 2, nothing written; Hydra's own answer is a traceback of up to 2,498 lines."""
    _, option, message = BROKEN[case]
    args = ["--config-dir", str(broken), option, *SHOWN.get(how, ["plan_only=true"])]
    if how == "slurm":
        from launcher.slurm import main as render

        monkeypatch.chdir(tmp_path)
        assert render(["cluster=a100x8", *args[:3]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and not list(tmp_path.iterdir()), err
    else:
        err = refused_in_process(args, tmp_path, monkeypatch, capsys)
    assert message in err and err.startswith("launcher: error: "), err
