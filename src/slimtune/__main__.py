"""`python -m slimtune` runs the `slimtune` command."""

from slimtune.cli.main import main

main()
