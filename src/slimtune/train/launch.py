"""`slimtune train ... --gpus N`: re-run the same command under torchrun with N processes on this host.

The child command is this one without `--gpus N`, started as
`python -m torch.distributed.run --standalone --nproc_per_node N -m slimtune train ...`; each child sees
WORLD_SIZE and so trains as one rank (see slimtune.train.distributed).
"""

from __future__ import annotations

import subprocess
import sys


def without_gpus(argv: list[str]) -> list[str]:
    """`argv` with `--gpus N` / `--gpus=N` removed."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def torchrun_command(gpus: int, args: list[str]) -> list[str]:
    """The torchrun command line that runs `slimtune <args>` on `gpus` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "slimtune", *args]


def relaunch(gpus: int, argv: list[str] | None = None) -> int:
    """Run this command again under torchrun; its exit code."""
    args = without_gpus(list(sys.argv[1:] if argv is None else argv))
    return subprocess.call(torchrun_command(gpus, args))
