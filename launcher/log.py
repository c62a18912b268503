"""What a run says, said once: on rank 0, printed (the run's output on stdout, warnings on stderr)
and recorded through the standard `logging` package (logger "launcher"), so the run's
launcher.log holds the same lines with their time and level.

Hydra's job logging (conf/hydra/job_logging/launcher.yaml) sends records at INFO and above to
<run>/launcher.log and warnings to stderr. A record the launcher printed carries `printed=True`,
and set_rank gives every console handler of the root logger a filter that drops such records
(NotPrinted), so each line reaches the terminal once under any logging configuration (Hydra's
`hydra/job_logging=default` too). Where no logging is configured (launcher.run from a script, the
workers of trainer.devices) the records go nowhere: the printed line is the output.
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("launcher")
LOGGER.addHandler(logging.NullHandler())  # never Python's last-resort handler: it would repeat
_rank = 0


def set_rank(rank: int) -> None:
    """This process's rank (the job's topology); only rank 0 speaks."""
    global _rank
    _rank = rank
    for handler in logging.getLogger().handlers:  # configured by now (Hydra: before the task)
        console = isinstance(handler, logging.StreamHandler)
        console = console and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, NotPrinted) for f in handler.filters):
            handler.addFilter(NotPrinted())


def info(message: str) -> None:
    """A line of the run's output: stdout, and INFO in the log."""
    _say(message, logging.INFO, err=False)


def warn(message: str) -> None:
    """Something the user should see: stderr, and WARNING in the log."""
    _say(message, logging.WARNING, err=True)


def _say(message: str, level: int, err: bool) -> None:
    if _rank != 0:
        return
    print(message, file=sys.stderr if err else sys.stdout, flush=True)
    LOGGER.log(level, message, extra={"printed": True})


class NotPrinted(logging.Filter):
    """For console handlers: drop the records the launcher has printed already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "printed", False)
