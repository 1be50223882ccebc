"""`python -m slimtune.cli` runs the `slimtune` command."""

from slimtune.cli.main import main

main()
