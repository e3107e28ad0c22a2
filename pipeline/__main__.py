"""`python -m pipeline` is the same as the `mner` console script."""

from pipeline.cli import main

main(prog_name="mner")
