"""`python -m medfed` runs the CLI."""

from medfed.cli import main

main()
