"""load_model: build a transformers causal LM on the meta device and stream its weights in, 4-bit.

The model skeleton is created with no memory (`torch.device("meta")`), then safetensors shards are
read one tensor at a time: each nn.Linear weight is moved to the target device, cast to the compute
dtype and quantized there, and its module is swapped for a Linear4bit; every other tensor (embeddings,
norms, the output head) is materialized in the compute dtype. Peak host memory is one tensor, not
one model. A checkpoint already saved in bitsandbytes' 4-bit layout (config.json with a
"bitsandbytes" quantization_config, keys `weight.absmax`, `weight.quant_map`, ...) is loaded as is.
A 4-bit model's config carries that quantization_config too (quant/saving.py), so transformers'
own `model.save_pretrained(folder)` writes a checkpoint both libraries load.

The output head (`model.get_output_embeddings()`, e.g. lm_head) is never quantized, so tied
embeddings stay tied.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slimtune.quant.linear4bit import Linear4bit
from slimtune.quant.options import QuantOptions, parse_compute_dtype, resolve_options
from slimtune.quant.saving import update_quantization_config
from slimtune.quant_format.nf4 import quantize_4bit
from slimtune.quant_format.state import QuantState

__all__ = ["load_model"]

_QUANT_SUFFIX = re.compile(
    r"^(.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$"
)


def load_model(
    path_or_name: str | os.PathLike,
    quantization: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    blocksize: int = 64,
    skip_modules: tuple[str, ...] | list[str] | None = None,
    *,
    load_in_4bit: bool | None = None,
    quantization_config: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a causal LM from a folder or hub name, its linear layers quantized to 4 bits.

    Args:
        path_or_name: a local folder in Hugging Face format (config.json + *.safetensors) or a hub id.
        quantization: "nf4", "fp4", or None for a plain model in `compute_dtype`.
        double_quant: also quantize the absmax scales (saves ~0.37 bit per weight).
        compute_dtype: matmul dtype and dtype of every non-quantized weight.
        device: where weights are quantized and kept; default cuda if available, else cpu.
        blocksize: weights per absmax block (64 as in QLoRA).
        skip_modules: linear layers kept unquantized, by full name or last name component.
        load_in_4bit, quantization_config: the transformers/bitsandbytes spelling of the same
            settings (a dict or BitsAndBytesConfig); its keys override the arguments above.
        **kwargs: `revision`, `token`, `cache_dir` go to the hub download, `revision` to AutoConfig,
            `attn_implementation` to the model; `dtype`/`torch_dtype` are read as compute_dtype; `device_map`
            naming one device is read as `device` (a map that spreads the model is refused). Any other
            keyword is refused with a TypeError. A true trust_remote_code is refused: no code from a model folder runs.
    """
    for key in ("dtype", "torch_dtype"):
        if key in kwargs and kwargs[key] not in (None, "auto"):
            compute_dtype = parse_compute_dtype(kwargs.pop(key), key)
        kwargs.pop(key, None)
    device = _single_device(kwargs.pop("device_map", None), device)
    if kwargs.pop("trust_remote_code", False):
        raise ValueError("trust_remote_code is refused: slimtune never runs code shipped with a model; load models whose "
                         "architecture transformers implements")
    unknown = sorted(set(kwargs) - _KNOWN_KWARGS)
    if unknown:
        raise TypeError(f"load_model: unknown keyword(s) {unknown}; allowed: {sorted(_KNOWN_KWARGS)}, device_map "
                        f"(one device), dtype/torch_dtype, trust_remote_code=False")
    options = resolve_options(
        quantization, double_quant, compute_dtype, blocksize, skip_modules, load_in_4bit, quantization_config
    )
    folder = _resolve_folder(str(path_or_name), kwargs)
    config, prequantized = _read_config(folder, kwargs)
    target = torch.device(device) if device is not None else _default_device()
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=options.compute_dtype, trust_remote_code=False,
                                                 **_model_kwargs(kwargs))
    quantize = {} if options.quant_type is None and not prequantized else _linear_targets(model, options)
    _Loader(model, options, target, quantize, prequantized).run(_iter_checkpoint(folder))
    update_quantization_config(model)
    model.eval()
    return model


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_KNOWN_KWARGS = frozenset({"revision", "token", "cache_dir", "attn_implementation"})


def _single_device(device_map: Any, device: torch.device | str | None) -> torch.device | str | None:
    """The one device a `device_map` names ("cpu", "cuda:0", 0, or {"": dev}); a map that spreads the model is refused."""
    if device_map is None:
        return device
    values = set(map(str, device_map.values())) if isinstance(device_map, dict) else {str(device_map)}
    if len(values) != 1 or values & {"auto", "balanced", "balanced_low_0", "sequential", "disk", "meta"}:
        raise ValueError(f"load_model: device_map={device_map!r} is refused: slimtune keeps a model on one device; "
                         f"pass one device (device_map='cuda:0' or device='cuda:0')")
    (only,) = values
    target = f"cuda:{only}" if only.isdigit() else only
    if device is not None and torch.device(device) != torch.device(target):
        raise ValueError(f"load_model: device={device!r} and device_map={device_map!r} disagree; pass one of them")
    return target


def _model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k == "attn_implementation"}


def _resolve_folder(path_or_name: str, kwargs: dict[str, Any]) -> str:
    if os.path.isdir(path_or_name):
        return path_or_name
    from huggingface_hub import snapshot_download  # lazy: only for hub names

    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
    return snapshot_download(path_or_name, allow_patterns=["*.json", "*.safetensors"], **hub_kwargs)


def _read_config(folder: str, kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """(transformers config without its quantization_config, whether the checkpoint is bnb 4-bit).

    The model is built from it plain; load_model records the quantization_config again from the loaded layers.
    """
    from transformers import AutoConfig

    config_kwargs = {k: v for k, v in kwargs.items() if k == "revision"}
    config = AutoConfig.from_pretrained(folder, **config_kwargs, trust_remote_code=False)
    qc = getattr(config, "quantization_config", None)
    prequantized = False
    if qc is not None:
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        if qc.get("quant_method") != "bitsandbytes" or not (
            qc.get("load_in_4bit") or qc.get("_load_in_4bit")
        ):
            raise ValueError(
                f"{folder}/config.json: quantization_config {qc.get('quant_method')!r} is not supported; "
                "slimtune loads plain checkpoints and bitsandbytes 4-bit ones"
            )
        prequantized = True
        del config.quantization_config
    return config, prequantized


def _linear_targets(model: nn.Module, options: QuantOptions) -> dict[str, nn.Linear]:
    """Names of the nn.Linear modules to quantize: all but the output head and `skip_modules`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if name in options.skip_modules or name.rsplit(".", 1)[-1] in options.skip_modules:
            continue
        targets[name] = module
    return targets


def _iter_checkpoint(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, cpu tensor) one at a time over all safetensors shards of `folder`."""
    from safetensors import SafetensorError, safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = _index_shards(index)
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise ValueError(
            f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors is read)"
        )
    for shard in shards:
        path = os.path.join(folder, shard)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield key, f.get_tensor(key)
        except (SafetensorError, OSError) as err:  # a truncated download, a missing shard
            raise ValueError(f"{path}: not a readable safetensors file ({err}); download it again") from None


def _index_shards(index: str) -> list[str]:
    """The shard files a model.safetensors.index.json names: plain file names inside its folder, nothing else."""
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{index}: not valid JSON ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: expected an object with a non-empty 'weight_map' of tensor name -> shard file")
    shards = sorted({v if isinstance(v, str) else repr(v) for v in weight_map.values()})
    for shard in shards:
        if os.path.basename(shard) != shard or shard in ("", ".", "..") \
                or not shard.endswith(".safetensors"):
            raise ValueError(f"{index}: shard {shard!r} is not a .safetensors file name inside the model folder; "
                             "shard paths may not leave it")
    return shards


class _Loader:
    """Puts streamed tensors into a meta-device model; one instance per load_model call."""

    def __init__(
        self,
        model: nn.Module,
        options: QuantOptions,
        device: torch.device,
        quantize: dict[str, nn.Linear],
        prequantized: bool,
    ) -> None:
        self.model, self.options, self.device = model, options, device
        self.quantize, self.prequantized = quantize, prequantized
        self.expected = set(model.state_dict().keys())
        self.prefix = getattr(model, "base_model_prefix", "")
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # 4-bit module name -> its tensors so far
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []

    def run(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        for key, tensor in tensors:
            self._put(self._rename(key), tensor)
        for module_name in list(self.pending):
            self._finish_prequantized(module_name, final=True)
        self._tie_and_materialize_buffers()
        self._check_complete()

    def _rename(self, key: str) -> str:
        # Checkpoints of a base model (no "model." prefix) loaded into a *ForCausalLM, and back.
        match = _QUANT_SUFFIX.match(key)
        probe = match.group(1) if match else key
        if probe in self.expected or not self.prefix:
            return key
        if f"{self.prefix}.{probe}" in self.expected:
            return f"{self.prefix}.{key}"
        if key.startswith(f"{self.prefix}.") and probe[len(self.prefix) + 1 :] in self.expected:
            return key[len(self.prefix) + 1 :]
        return key

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        match = _QUANT_SUFFIX.match(key)
        module_name, _, leaf = (match.group(1) if match else key).rpartition(".")
        if module_name in self.quantize and (self.prequantized or match):
            self.pending.setdefault(module_name, {})[key] = tensor
            self._finish_prequantized(module_name, final=False)
        elif match:
            self.unexpected.append(key)  # quant state of a module we do not quantize
        elif module_name in self.quantize and leaf == "weight":
            self._swap(module_name, *quantize_4bit(
                tensor.to(self.device, self.options.compute_dtype), self.options.quant_type,
                self.options.blocksize, self.options.double_quant,
            ))  # fmt: skip
        elif key in self.expected:
            self._set_tensor(key, tensor)
        else:
            self.unexpected.append(key)

    def _finish_prequantized(self, module_name: str, final: bool) -> None:
        """Build the Linear4bit once its packed weight and all quant-state keys have arrived."""
        tensors = self.pending[module_name]
        weight_key = f"{module_name}.weight"
        has_json = any(k.startswith(f"{weight_key}.quant_state.") for k in tensors)
        if not final and not (weight_key in tensors and has_json):
            return
        if weight_key not in tensors:
            raise ValueError(
                f"4-bit checkpoint: quant state for {weight_key!r} found but the packed weight is missing"
            )
        if not has_json:
            raise ValueError(
                f"4-bit checkpoint: tensor {weight_key!r} ({tensors[weight_key].dtype}) has no "
                f"'{weight_key}.quant_state.bitsandbytes__nf4' (or __fp4) key; its quant state is missing"
            )
        try:
            state = QuantState.from_dict(tensors, prefix=f"{weight_key}.", device=self.device,
                                         packed=tensors[weight_key])
        except ValueError:
            if not final:
                return  # more keys of this module may still come from a later shard
            raise
        expected = tuple(self.model.get_submodule(module_name).weight.shape)
        if tuple(state.shape) != expected:
            raise ValueError(f"4-bit checkpoint: {weight_key!r} has quant-state shape {tuple(state.shape)}, the "
                             f"model's config expects {expected}")
        del self.pending[module_name]
        self._swap(module_name, tensors[weight_key].to(self.device), state)
        for key in tensors:
            self.loaded.add(key)

    def _swap(self, module_name: str, packed: torch.Tensor, state: QuantState) -> None:
        old = self.model.get_submodule(module_name)
        bias = getattr(old, "bias", None)
        keep_bias = bias is not None and not bias.is_meta  # a bias that arrived before its weight
        new = Linear4bit(packed, state, bias.data if keep_bias else None, self.options.compute_dtype)
        if bias is not None and not keep_bias:
            new.bias = nn.Parameter(bias, requires_grad=False)  # meta placeholder, filled when it arrives
        parent, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, new)
        self.loaded.add(f"{module_name}.weight")

    def _set_tensor(self, key: str, tensor: torch.Tensor) -> None:
        module_name, _, leaf = key.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        value = tensor.to(self.device)
        if value.is_floating_point():
            value = value.to(self.options.compute_dtype)
        if leaf in module._parameters:
            trainable = not isinstance(module, Linear4bit)
            module._parameters[leaf] = nn.Parameter(value, requires_grad=trainable)
        else:
            module._buffers[leaf] = value
        self.loaded.add(key)

    def _tie_and_materialize_buffers(self) -> None:
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        for module in self.model.modules():
            meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
            if not meta:
                continue
            for name in meta:
                module._buffers[name] = torch.zeros_like(module._buffers[name], device=self.device)
            self._recompute_buffers(module)

    def _recompute_buffers(self, module: nn.Module) -> None:
        # Non-persistent buffers (rotary inv_freq, position_ids) are not in checkpoints; the model's
        # own `_init_weights` computes them. It may also re-initialize the module's parameters, so
        # those are saved and put back.
        own = {n: p.data.clone() for n, p in module._parameters.items() if p is not None and not p.is_meta}
        init = getattr(self.model, "_init_weights", None)
        if init is None:
            raise ValueError(
                f"cannot compute buffers of {type(module).__name__}: the model has no _init_weights"
            )
        with torch.no_grad():
            init(module)
            for n, data in own.items():
                module._parameters[n].data.copy_(data)

    def _check_complete(self) -> None:
        meta = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if meta:
            raise ValueError(f"checkpoint is missing tensors for {meta[:8]}{' ...' if len(meta) > 8 else ''}")
        if self.unexpected:
            shown = self.unexpected[:8]
            warnings.warn(
                f"load_model ignored {len(self.unexpected)} checkpoint tensors not in the model: {shown}",
                stacklevel=2,
            )
