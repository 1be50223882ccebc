"""Which folders a run may write into: new or empty ones, and run folders that carry slimtune's marker.

# Note: run folder ownership
A run rewrites config.yaml, metrics.jsonl, loss.png, README.md and adapter/ in its folder and prunes
checkpoints/; `slimtune demo` replaces its whole folder. That is only safe in a folder slimtune made.
A folder is a run folder when it holds RUN_MARKER, written the moment `train` or `demo` creates (or
takes an empty) folder. A folder that holds anything else and no marker is refused, whatever its files
are called: a `config.yaml` or a `checkpoints/` of someone else's project proves nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUN_MARKER = ".slimtune-run.json"
"""File in every run folder that slimtune created; its JSON names the command that created it."""

COMMANDS = ("train", "demo")


def marker_command(folder: Path) -> str | None:
    """The command that created run folder `folder` ('train' or 'demo'), or None if it is not a run folder."""
    try:
        data: Any = json.loads((folder / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    command = data.get("command") if isinstance(data, dict) else None
    return command if command in COMMANDS else None


def is_empty_or_missing(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def check_run_folder(folder: Path, option: str) -> None:
    """Raise ValueError unless `folder` is missing, an empty folder, or a run folder slimtune created.

    `option` names the setting in the message (`output_dir`, `--output-dir`).
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file, not a folder; choose a new or empty folder")
    if is_empty_or_missing(folder) or marker_command(folder) is not None:
        return
    raise ValueError(
        f"{option} {folder} holds files and is not a slimtune run folder (it has no {RUN_MARKER}); slimtune writes "
        f"only into a new or empty folder or a run folder it created, so it leaves this one alone: choose another "
        f"{option}. To continue a run there anyway, create the marker: "
        f"echo '{{\"command\": \"train\"}}' > {folder / RUN_MARKER}"
    )


def claim_run_folder(folder: Path, command: str) -> None:
    """Create `folder` (or take it while empty) as a run folder of `command`: write RUN_MARKER atomically.

    A folder that already carries the marker keeps it; check_run_folder must have accepted `folder`.
    """
    assert command in COMMANDS, command
    folder.mkdir(parents=True, exist_ok=True)
    if marker_command(folder) is not None:
        return
    if any(folder.iterdir()):
        raise ValueError(f"{folder} filled up while the run was starting; it is not claimed as a run folder")
    tmp = folder / f"{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps({"command": command, "what": "a slimtune run folder: slimtune may rewrite and "
                                                          "prune its files"}) + "\n", encoding="utf-8")
    os.replace(tmp, folder / RUN_MARKER)
