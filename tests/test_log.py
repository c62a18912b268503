"""What a run says is said once (launcher/log.py): printed on rank 0, recorded in the run's
launcher.log through `logging`, never repeated by a console handler, silent on other ranks."""

from __future__ import annotations

import io
import logging

import pytest

from launcher import log
from tests.helpers import SMALL_DATA, run_cli


@pytest.fixture
def handlers(tmp_path):
    """A console and a file handler on the root logger, as Hydra's job logging sets them up."""
    root = logging.getLogger()
    console_stream = io.StringIO()
    console = logging.StreamHandler(console_stream)
    console.setLevel(logging.WARNING)
    file = logging.FileHandler(tmp_path / "launcher.log")
    file.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(console)
    root.addHandler(file)
    yield console_stream, tmp_path / "launcher.log"
    root.removeHandler(console)
    root.removeHandler(file)
    root.setLevel(level)
    file.close()
    log.set_rank(0)


def test_rank_zero_prints_once_and_records_it(handlers, capsys):
    console, path = handlers
    log.set_rank(0)
    log.info("the plan")
    log.warn("launcher: a warning")
    out, err = capsys.readouterr()
    assert (out, err) == ("the plan\n", "launcher: a warning\n")
    assert console.getvalue() == ""  # the console handler does not repeat a printed line
    assert path.read_text().splitlines() == ["INFO the plan", "WARNING launcher: a warning"]
    logging.getLogger("someone.else").warning("not ours")  # other records still reach it
    assert console.getvalue() == "not ours\n"


def test_other_ranks_say_nothing(handlers, capsys):
    console, path = handlers
    log.set_rank(1)
    log.info("the plan")
    log.warn("launcher: a warning")
    assert capsys.readouterr() == ("", "")
    assert console.getvalue() == "" and path.read_text() == ""


@pytest.mark.slow
def test_a_runs_log_holds_what_it_printed_and_stderr_each_warning_once(tmp_path):
    """An injected out-of-memory error: its line once on stderr (Hydra's console handler would
    otherwise add a formatted copy), and in launcher.log beside the plan and the result."""
    args = [*SMALL_DATA, "model=mlp", "global_batch=64", "micro_batch=32", "trainer.epochs=1"]
    res = run_cli(
        [*args, "trainer.progress=false", "run_dir=run"],
        tmp_path,
        env={"LAUNCHER_TEST_OOM": "0:2:16"},
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("OUT OF MEMORY") == 1
    assert "test accuracy" in res.stdout
    text = (tmp_path / "run" / "launcher.log").read_text()
    assert "[launcher][WARNING] - launcher: OUT OF MEMORY on rank(s) [0] at step 2" in text
    assert "[launcher][INFO] - " in text and "global_batch" in text and "test accuracy" in text
