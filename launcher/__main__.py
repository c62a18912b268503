"""`python -m launcher ...`"""

from launcher.cli import console

console()
