"""The `slimtune` command line: train, data inspect, demo (see slimtune.cli.main)."""
