"""`python -m mner` is the same as the `mner` console script."""

from mner.cli import main

main(prog_name="mner")
