"""The launcher's own outcomes, each with its exit code and the one line the CLI prints.

    0  done
    1  failed: out of memory at micro-batch 1, a worker that failed (its own code), a bug
    2  bad input (ConfigError): `launcher: error: KEY=VALUE: what is allowed`, nothing written
    3  stopped by a signal after a checkpoint (preemption.Stopped)
    4  diverged (guard.Diverged)
    5  a file of the run could not be written (paths.WriteFailed)

cli.py maps any LauncherError to its code and line; hydra_app carries them through Hydra. No
torch here.
"""

from __future__ import annotations


class LauncherError(Exception):
    """An outcome the launcher explains in one line (anything else is a bug: a traceback)."""

    exit_code = 1
    prefix = "launcher: error: "  # "" for errors whose message is the whole line

    def line(self) -> str:
        return f"{self.prefix}{self}"


class ConfigError(LauncherError, ValueError):
    """Bad user input: the CLI prints the message as one line and exits 2."""

    exit_code = 2
