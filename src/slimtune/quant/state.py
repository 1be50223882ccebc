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

__all__ = ["QuantState", "NestedState", "QUANT_STATE_KEYS"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANT_STATE_KEYS: tuple[str, ...] = ("absmax", "quant_map")
_NESTED_KEYS: tuple[str, ...] = ("nested_absmax", "nested_quant_map")
_PACKED_PREFIX = "quant_state.bitsandbytes__"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{key}: dtype {name!r} is not supported; allowed: {tuple(_DTYPES)}")
    return _DTYPES[name]


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
            "dtype": _dtype_name(self.dtype),
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
        cls, tensors: dict[str, torch.Tensor], prefix: str = "", device: torch.device | str | None = None
    ) -> QuantState:
        """Read the keys written by `as_dict` (or by bitsandbytes). Raises ValueError naming missing keys."""
        packed_keys = [k for k in tensors if k.startswith(f"{prefix}{_PACKED_PREFIX}")]
        if len(packed_keys) != 1:
            raise ValueError(
                f"4-bit tensor {prefix.rstrip('.')!r}: expected exactly one key "
                f"'{prefix}{_PACKED_PREFIX}nf4' or '...fp4', found {packed_keys or 'none'}"
            )
        fields = json.loads(bytes(tensors[packed_keys[0]].cpu().tolist()).decode("utf-8"))
        required = [f"{prefix}{k}" for k in QUANT_STATE_KEYS]
        if "nested_offset" in fields:
            required += [f"{prefix}{k}" for k in _NESTED_KEYS]
        missing = [k for k in required if k not in tensors]
        if missing:
            raise ValueError(
                f"4-bit tensor {prefix.rstrip('.')!r} is missing quant-state keys {missing}; "
                f"a bitsandbytes 4-bit checkpoint needs {required + packed_keys}"
            )
        quant_type = fields.get("quant_type")
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(
                f"{packed_keys[0]}: quant_type {quant_type!r} is not supported; allowed: ('nf4', 'fp4')"
            )
        state2 = None
        if "nested_offset" in fields:
            state2 = NestedState(
                absmax=tensors[f"{prefix}nested_absmax"].to(device).float(),
                code=tensors[f"{prefix}nested_quant_map"].to(device).float(),
                offset=torch.tensor(float(fields["nested_offset"]), dtype=torch.float32, device=device),
                blocksize=int(fields["nested_blocksize"]),
            )
        return cls(
            absmax=tensors[f"{prefix}absmax"].to(device),
            shape=torch.Size(fields["shape"]),
            dtype=_parse_dtype(fields["dtype"], packed_keys[0]),
            blocksize=int(fields["blocksize"]),
            quant_type=quant_type,
            code=tensors[f"{prefix}quant_map"].to(device).float(),
            state2=state2,
        )
