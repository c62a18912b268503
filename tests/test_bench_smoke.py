"""Every benchmark keeps a --smoke mode, and CI runs them all (bench/smoke.py; issue 33). Read,
not run: the runner itself is CI's step, and the fast tier starts no process."""

from __future__ import annotations

import importlib.util

from tests.helpers import ROOT


def _runner():
    spec = importlib.util.spec_from_file_location("bench_smoke", ROOT / "bench" / "smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_bench_script_defines_a_smoke_argument(tmp_path):
    runner = _runner()
    scripts = runner.scripts()
    assert len(scripts) >= 15 and "smoke.py" not in {p.name for p in scripts}
    assert [p.name for p in scripts if not runner.declares_smoke(p)] == []
    bare = tmp_path / "new_bench.py"  # what the check refuses: a parser without --smoke
    bare.write_text('parser.add_argument("--steps", type=int)\n# --smoke in a comment\n')
    assert not runner.declares_smoke(bare)


def test_ci_runs_the_smoke_runner_in_its_venv_before_the_tests():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    venv = lines.index("python3 -m venv .venv")
    assert (
        venv
        < lines.index(".venv/bin/python bench/smoke.py")
        < lines.index(".venv/bin/python -m pytest")
    )
