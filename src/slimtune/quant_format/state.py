"""QuantState: what is needed to dequantize a packed 4-bit tensor, and its bitsandbytes serialization.

On disk (safetensors) bitsandbytes stores, next to the packed `weight` (ceil(numel / 2), 1) uint8:
    weight.absmax                            fp32 (n_blocks,), or uint8 (n_blocks,) when nested
    weight.quant_map                         fp32 (16,) the 4-bit codebook
    weight.nested_absmax                     fp32 (n_blocks / 256,)       [nested only]
    weight.nested_quant_map                  fp32 (256,) dynamic map      [nested only]
    weight.quant_state.bitsandbytes__<type>  uint8 (L,) UTF-8 JSON of the non-tensor fields:
        {"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize", "nested_dtype",
         "nested_offset"]}
`QuantState.as_dict(prefix)` writes exactly these keys and bytes, `QuantState.from_dict` reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from slimtune.dtypes import TORCH_NAMES, dtype_name, parse_dtype

__all__ = ["QuantState", "NestedState", "QUANT_STATE_KEYS", "VALID_BLOCKSIZES", "check_blocksize"]

VALID_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Values per absmax block (and per nested block) that the quantizer, the Triton kernels and bitsandbytes take."""

QUANT_STATE_KEYS: tuple[str, ...] = ("absmax", "quant_map")
_NESTED_KEYS: tuple[str, ...] = ("nested_absmax", "nested_quant_map")
_PACKED_PREFIX = "quant_state.bitsandbytes__"


def check_blocksize(value: object, what: str = "blocksize") -> int:
    """`value` when it is one of VALID_BLOCKSIZES (an int, not a bool or a float); else ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in VALID_BLOCKSIZES:
        raise ValueError(f"{what} {value!r} is not supported; allowed: {VALID_BLOCKSIZES}")
    return value


@dataclass
class NestedState:
    """Double quantization of the absmax vector: absmax_fp32 = code[q] * absmax[block] + offset.

    Fields:
        absmax: fp32 (ceil(n_blocks / blocksize),), absmax of each block of (absmax - offset).
        code: fp32 (256,), the 8-bit dynamic map.
        offset: fp32 scalar tensor (), the mean of the original absmax vector.
        blocksize: values per nested block (bitsandbytes uses 256).
    """

    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor
    blocksize: int = 256


@dataclass
class QuantState:
    """State of one packed 4-bit tensor.

    Fields:
        absmax: (n_blocks,) fp32 per-block scale, or uint8 codes of it when `state2` is set.
        shape: shape of the original tensor, e.g. (out_features, in_features).
        dtype: dtype of the original tensor, the dtype dequantize_4bit returns.
        blocksize: values per absmax block.
        quant_type: "nf4" or "fp4".
        code: fp32 (16,) codebook indexed by nibble.
        state2: double-quantization state of absmax, or None.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    state2: NestedState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on `device`."""
        state2 = None
        if self.state2 is not None:
            s2 = self.state2
            state2 = NestedState(s2.absmax.to(device), s2.code.to(device), s2.offset.to(device), s2.blocksize)
        return QuantState(
            self.absmax.to(device), self.shape, self.dtype, self.blocksize, self.quant_type,
            self.code.to(device), state2,
        )  # fmt: skip

    def _json_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.state2 is not None:
            fields["nested_blocksize"] = self.state2.blocksize
            fields["nested_dtype"] = "float32"
            fields["nested_offset"] = self.state2.offset.item()
        return fields

    def as_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' keys (`prefix` is e.g. "model.layers.0.mlp.up_proj.weight.")."""
        out = {f"{prefix}absmax": self.absmax, f"{prefix}quant_map": self.code}
        if self.state2 is not None:
            out[f"{prefix}nested_absmax"] = self.state2.absmax
            # A separate copy, so safetensors never sees two names for one storage.
            out[f"{prefix}nested_quant_map"] = self.state2.code.clone()
        blob = json.dumps(self._json_fields()).encode("utf-8")
        out[f"{prefix}{_PACKED_PREFIX}{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_dict(
        cls,
        tensors: dict[str, torch.Tensor],
        prefix: str = "",
        device: torch.device | str | None = None,
        packed: torch.Tensor | None = None,
    ) -> QuantState:
        """Read the keys written by `as_dict` (or by bitsandbytes). Raises ValueError naming missing keys.

        Every field is checked against the others (absmax has one entry per block, the codebooks have 16 and
        256 entries, `packed`, when given, holds ceil(numel / 2) bytes), so a damaged checkpoint is refused
        here rather than failing, or silently computing garbage, at the first forward.
        """
        name = prefix.rstrip(".")
        packed_keys = [k for k in tensors if k.startswith(f"{prefix}{_PACKED_PREFIX}")]
        if len(packed_keys) != 1:
            raise ValueError(
                f"4-bit tensor {name!r}: expected exactly one key "
                f"'{prefix}{_PACKED_PREFIX}nf4' or '...fp4', found {packed_keys or 'none'}"
            )
        fields = _read_fields(tensors[packed_keys[0]], packed_keys[0])
        required = [f"{prefix}{k}" for k in QUANT_STATE_KEYS]
        if "nested_offset" in fields:
            required += [f"{prefix}{k}" for k in _NESTED_KEYS]
        missing = [k for k in required if k not in tensors]
        if missing:
            raise ValueError(
                f"4-bit tensor {name!r} is missing quant-state keys {missing}; "
                f"a bitsandbytes 4-bit checkpoint needs {required + packed_keys}"
            )
        quant_type = fields.get("quant_type")
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(
                f"{packed_keys[0]}: quant_type {quant_type!r} is not supported; allowed: ('nf4', 'fp4')"
            )
        shape = _positive_ints(fields.get("shape"), f"{packed_keys[0]}: shape", allow_zero=True)
        blocksize = check_blocksize(fields.get("blocksize"), f"{packed_keys[0]}: blocksize")
        dtype = parse_dtype(fields.get("dtype"), f"{packed_keys[0]}: dtype", TORCH_NAMES)
        numel = torch.Size(shape).numel()
        n_blocks = -(-numel // blocksize)
        absmax, code = tensors[f"{prefix}absmax"], tensors[f"{prefix}quant_map"]
        _check_numel(absmax, n_blocks, f"{prefix}absmax", f"one per block of {blocksize} of shape {shape}")
        _check_numel(code, 16, f"{prefix}quant_map", "the 4-bit codebook")
        if packed is not None:
            _check_numel(packed.reshape(-1).view(torch.uint8), (numel + 1) // 2, name, f"packed bytes of {shape}")
        state2 = None
        if "nested_offset" in fields:
            state2 = _nested_state(tensors, prefix, fields, packed_keys[0], n_blocks, device)
            if absmax.dtype != torch.uint8:
                raise ValueError(f"{prefix}absmax: a nested (double-quantized) absmax is uint8, got {absmax.dtype}")
        elif not absmax.is_floating_point():
            raise ValueError(f"{prefix}absmax: expected float scales, got {absmax.dtype} (and no nested_offset)")
        return cls(
            absmax=absmax.to(device),
            shape=torch.Size(shape),
            dtype=dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            code=code.to(device).float(),
            state2=state2,
        )


def _read_fields(blob: torch.Tensor, key: str) -> dict[str, object]:
    """The JSON object stored as uint8 bytes under `key`."""
    try:
        fields = json.loads(bytes(blob.reshape(-1).to(torch.uint8).cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{key}: not a JSON quant state ({err})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{key}: the quant state must be a JSON object, got {type(fields).__name__}")
    return fields


def _positive_ints(value: object, what: str, allow_zero: bool = False) -> list[int]:
    low = 0 if allow_zero else 1
    if not isinstance(value, list) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and low <= v < 2**40 for v in value
    ):
        raise ValueError(f"{what} must be a list of integers >= {low}, got {value!r}")
    return value


def _check_numel(t: torch.Tensor, expected: int, key: str, why: str) -> None:
    if t.numel() != expected:
        raise ValueError(f"{key}: has {t.numel()} values, expected {expected} ({why})")


def _nested_state(tensors: dict[str, torch.Tensor], prefix: str, fields: dict[str, object], key: str,
                  n_blocks: int, device: torch.device | str | None) -> NestedState:
    blocksize = check_blocksize(fields.get("nested_blocksize"), f"{key}: nested_blocksize")
    offset = fields.get("nested_offset")
    if not isinstance(offset, int | float) or isinstance(offset, bool) or offset != offset or abs(offset) == float("inf"):
        raise ValueError(f"{key}: nested_offset must be a finite number, got {offset!r}")
    absmax, code = tensors[f"{prefix}nested_absmax"], tensors[f"{prefix}nested_quant_map"]
    _check_numel(absmax, -(-n_blocks // blocksize), f"{prefix}nested_absmax", f"one per {blocksize} absmax values")
    _check_numel(code, 256, f"{prefix}nested_quant_map", "the 8-bit dynamic map")
    return NestedState(
        absmax=absmax.to(device).float(),
        code=code.to(device).float(),
        offset=torch.tensor(float(offset), dtype=torch.float32, device=device),
        blocksize=blocksize,
    )
