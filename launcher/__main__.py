"""`python -m launcher ...`"""

import os
import sys

from launcher.cli import main

try:
    sys.exit(main())
except BrokenPipeError:  # e.g. `python -m launcher --help | head`: the reader left, not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
