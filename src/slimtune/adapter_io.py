"""Adapter weights on disk in PEFT's format: name mapping, safetensors I/O, and load-time checks.

Only safetensors is read: nothing is ever unpickled. Every write goes to a temporary file that is
renamed into place, so an interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimtune.config import CONFIG_NAME, WEIGHTS_NAME


def to_file_key(key: str, adapter_name: str) -> str | None:
    """Map an in-memory state-dict key to PEFT's file key for `adapter_name`; None if it is not the adapter's."""
    for marker in (f".adapters.{adapter_name}.", f".modules_to_save.{adapter_name}."):
        if marker in key:
            return key.replace(marker, ".")
    return None


def adapter_keys(full_keys: Iterable[str], adapter_name: str, extras: Iterable[str] = ()) -> dict[str, str]:
    """{file key: in-memory key} for every tensor that belongs to the adapter.

    `extras` are base tensors the adapter also trains (LoRA's bias='all'); like peft, a bias inside a
    modules_to_save copy is written once more under `...modules_to_save.<param>`.
    """
    mapping = {fk: k for k in full_keys if (fk := to_file_key(k, adapter_name)) is not None}
    mapping.update({k.replace(f".modules_to_save.{adapter_name}.", ".modules_to_save."): k for k in extras})
    return mapping


def write_weights(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Save tensors as adapter_model.safetensors (contiguous private copies, atomic rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / WEIGHTS_NAME)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Load adapter_model.safetensors; refuse pickle files with a clear message."""
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        pickled = directory / "adapter_model.bin"
        hint = (" (found adapter_model.bin: slimtune never unpickles weights; convert it to safetensors)"
                if pickled.exists() else "")
        raise ValueError(f"{file}: adapter weights not found{hint}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from None


def check_and_match(file_sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                    source: str) -> None:
    """Raise ValueError unless file_sd has exactly the expected keys with the expected shapes."""
    # peft's bias='all' also writes the frozen original of a modules_to_save module: nothing trained there
    unknown = sorted(k for k in set(file_sd) - set(expected) if ".original_module." not in k)
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} tensor(s) match no adapter module of this base model, e.g. "
            f"{', '.join(unknown[:3])}. Was the adapter trained on a different base model or with other target_modules?"
        )
    missing = sorted(set(expected) - set(file_sd))
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} adapter tensor(s), e.g. {', '.join(missing[:3])}")
    for key, tensor in file_sd.items():
        if key not in expected:
            continue
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[key].shape)}; the adapter does not fit this base model"
            )
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise ValueError(f"{source}: tensor {key} has dtype {tensor.dtype}; adapter weights are floating point "
                             f"(the model holds {expected[key].dtype})")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source}: tensor {key} holds NaN or inf values; an adapter's weights must be finite")


def resolve_adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None,
                        revision: str | None = None) -> Path:
    """A local folder holding the adapter: the path itself, or a hub snapshot of the two adapter files."""
    path = Path(model_id)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        return path
    if Path(model_id).exists() or str(model_id).startswith((".", "/")):
        raise ValueError(f"{path}: adapter folder not found")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise ValueError(f"{model_id}: not a local folder, and huggingface_hub is not installed") from None
    patterns = [f"{subfolder}/{n}" if subfolder else n for n in (CONFIG_NAME, WEIGHTS_NAME)]
    try:
        root = snapshot_download(str(model_id), revision=revision, allow_patterns=patterns)
    except Exception as err:  # the hub client raises many types; all mean "could not fetch"
        raise ValueError(f"{model_id}: not a local folder and could not be fetched from the hub ({err})") from None
    return Path(root) / subfolder if subfolder else Path(root)
