"""manifest.json: how a checkpoint proves that its files are the ones that were written.

The manifest is written last (Note: atomic checkpoints, in train/checkpoint.py) and records the step and,
for every other file of the checkpoint, its size and sha256. A checkpoint is trusted only when every
listed file is there with that size and hash: a flipped byte, a truncated file or one copied in from
another step fails here, before anything is loaded. Format 1 manifests (a plain list of names) carry no
sizes or hashes; their files are checked for presence only, and `Manifest.verified` says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["FORMAT_VERSION", "MANIFEST", "CheckpointDamaged", "Manifest", "sha256", "verify_manifest",
           "write_manifest"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_FORMAT_WITHOUT_HASHES = 1
_CHUNK = 1 << 20


class CheckpointDamaged(ValueError):
    """A file of a checkpoint is missing, damaged or inconsistent with the rest; names the file."""

    def __init__(self, file: Path, reason: str):
        self.file, self.reason = file, reason
        super().__init__(f"checkpoint {file.parent}: {file.name} {reason}")


@dataclass(frozen=True)
class Manifest:
    step: int
    """The step the checkpoint was written at."""
    files: tuple[str, ...]
    """Every file of the checkpoint but the manifest, relative to its folder."""
    verified: bool
    """Whether sizes and sha256 of the files were checked (format 2)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """Record size and sha256 of every file under `folder`, then write manifest.json (fsync'ed)."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    text = json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1)
    with open(folder / MANIFEST, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def verify_manifest(folder: Path, step: int) -> Manifest:
    """The manifest of checkpoint `folder` (named for `step`), once every file it lists proved itself.

    Raises CheckpointDamaged naming the manifest or the first file that is missing, of another size or
    of another sha256.
    """
    path = folder / MANIFEST
    raw = _read_json(path)
    fmt, files = raw.get("format"), raw.get("files")
    if fmt not in (_FORMAT_WITHOUT_HASHES, FORMAT_VERSION):
        raise CheckpointDamaged(path, f"has format {fmt!r}; this slimtune reads formats 1 and {FORMAT_VERSION}")
    if raw.get("step") != step or isinstance(raw.get("step"), bool):
        raise CheckpointDamaged(path, f"is for step {raw.get('step')!r}, but the folder is {folder.name}")
    if fmt == _FORMAT_WITHOUT_HASHES:
        if not isinstance(files, list) or not all(isinstance(n, str) for n in files):
            raise CheckpointDamaged(path, "must list the checkpoint's files")
        for name in files:
            if not _inside(folder, name).is_file():
                raise CheckpointDamaged(folder / name, "is missing (listed in the manifest)")
        return Manifest(step, tuple(files), verified=False)
    if not isinstance(files, dict) or not all(_is_entry(v) for v in files.values()):
        raise CheckpointDamaged(path, 'must map each file to {"size": bytes, "sha256": hex digest}')
    for name, entry in files.items():
        _verify_file(_inside(folder, name), entry)
    return Manifest(step, tuple(files), verified=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointDamaged(path, f"is unreadable ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(raw, dict):
        raise CheckpointDamaged(path, f"must be a JSON object, got {type(raw).__name__}")
    return raw


def _inside(folder: Path, name: str) -> Path:
    """folder/name, refusing names that are absolute or climb out of the folder."""
    parts = PurePosixPath(name).parts
    if not name or PurePosixPath(name).is_absolute() or ".." in parts or name == MANIFEST:
        raise CheckpointDamaged(folder / MANIFEST, f"lists {name!r}, which is not a file of the checkpoint")
    return folder.joinpath(*parts)


def _is_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("size"), int) and not isinstance(entry["size"], bool)
            and isinstance(entry.get("sha256"), str))


def _verify_file(path: Path, entry: dict[str, Any]) -> None:
    try:
        size = path.stat().st_size
        digest = sha256(path) if size == entry["size"] else ""
    except OSError as err:
        raise CheckpointDamaged(path, f"is missing or unreadable ({err.strerror or err})") from None
    if size != entry["size"]:
        raise CheckpointDamaged(path, f"has {size} bytes, the manifest says {entry['size']}")
    if digest != entry["sha256"]:
        raise CheckpointDamaged(path, f"has sha256 {digest[:12]}..., the manifest says {entry['sha256'][:12]}...: "
                                      "its content changed after it was written")
