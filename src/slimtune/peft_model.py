"""PeftModel: wraps a transformers model, holds named adapters, saves/loads them in PEFT's format.

The API is HF peft's (get_peft_model, PeftModel.from_pretrained, save_pretrained, merge_and_unload, ...)
so code written for peft runs with `peft` replaced by `slimtune`. Methods plug in through the registry
and the AdapterLayer protocol; nothing here asks which method an adapter uses.

# Note: state_dict() is the adapter
transformers.Trainer saves any model that is not a PreTrainedModel (or peft's own PeftModel class)
by writing `model.state_dict()` to model.safetensors, and reloads it with `load_state_dict`. So that
Trainer checkpoints hold the adapter only (not a multi-GB copy of the frozen base) and resume works,
PeftModel.state_dict() returns the active adapter in PEFT's key format and load_state_dict() accepts
it. The full model's tensors stay reachable through `model.get_base_model().state_dict()`.
One exception: a *trainable* prompt-learning adapter's file holds only its encoder's output
(`prompt_embeddings`), not the encoder (P-tuning's MLP, prefix tuning's projection), so for exact resume
state_dict() holds the encoder's own tensors under `prompt_encoder.<name>` keys instead. state_dict() also keeps
the training shapes (save_pretrained applies the method's `to_file`, e.g. AdaLoRA's pruning) and carries the
method's run state (`method_state.` keys, e.g. AdaLoRA's rank allocator), so that resume is exact.

# Note: prompt-learning adapters
Prompt tuning, prefix tuning and P-tuning put nothing inside the base model: each adapter is an encoder in
`self.prompt_encoder[name]` (peft's attribute name) and the method's `PromptHooks` (see methods/spec.py) apply
its output in forward and generate. Layer methods and prompt methods are not mixed in one PeftModel (as in
peft); several adapters of prompt methods are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune import adapter_io
from slimtune.adapter_layer import ModulesToSave, is_adapter_layer
from slimtune.config import PeftConfig, TaskType
from slimtune.methods.spec import MethodSpec, PromptHooks
from slimtune.quant.linear4bit import Linear4bit
from slimtune.quant.saving import update_quantization_config
from slimtune.registry import get_method
from slimtune.targeting import find_targets

CLASSIFIER_NAMES = ("classifier", "score")
_PREFIX = "base_model.model."
_RUN_STATE = "method_state."  # state_dict() keys of the run state (see Note: state_dict() is the adapter)


class AdaptedModel(nn.Module):
    """The tuner layer of peft's layout (`peft_model.base_model.model` is the transformers model).

    Calling it runs the transformers model's backbone (`model.base_model`, e.g. LlamaModel), as calling
    `base_model` does on any PreTrainedModel: TRL's SFTTrainer patches the forward of the model it is
    given and reads hidden states from `self.base_model(...)` to compute its chunked loss. An active
    prompt-learning adapter applies there too (PromptHooks.backbone), so that loss trains the prompt.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        backbone = getattr(self.model, "base_model", self.model)
        owner = self.__dict__.get("_peft_owner")
        if owner is None or (hooks := owner._prompt_hooks()) is None:
            return backbone(*args, **kwargs)
        kwargs.update(zip(("input_ids", "attention_mask"), args))  # positional order of every backbone forward
        return hooks.backbone(backbone, owner._prompt(), owner.peft_config[owner.active_adapter], kwargs)

    def update_and_allocate(self, global_step: int) -> None:
        """peft's spelling (`model.base_model.update_and_allocate(step)`); see PeftModel.update_and_allocate."""
        self._peft_owner.update_and_allocate(global_step)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)


class PeftModel(nn.Module):
    """A model with one or more named adapters, one of them active."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.base_model = AdaptedModel(model)
        self.base_model.__dict__["_peft_owner"] = self  # a back-reference, not a submodule
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self._autocast_adapter_dtype = autocast_adapter_dtype
        self.prompt_encoder = nn.ModuleDict()  # see Note: prompt-learning adapters
        self._prompt_disabled = False
        self.add_adapter(adapter_name, peft_config)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5.2 names it is_gradient_checkpointing
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings + checkpointing still need input grads

    # ---- pass-through ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """The base model's forward. The named arguments are spelled out (as in peft) because
        transformers.Trainer keeps only dataset columns that appear in this signature."""
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                     labels=labels, position_ids=position_ids, token_type_ids=token_type_ids,
                     decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask)
        kwargs.update({k: v for k, v in named.items() if v is not None})
        if (hooks := self._prompt_hooks()) is not None:
            config = self.peft_config[self.active_adapter]
            return hooks.forward(self.get_base_model(), self._prompt(), config, kwargs)
        outputs = self.get_base_model()(**kwargs)
        extra = self.regularization_loss()
        if extra is not None and getattr(outputs, "loss", None) is not None:
            outputs.loss = outputs.loss + extra
        return outputs

    def regularization_loss(self) -> torch.Tensor | None:
        """The active method's training-time penalty (AdaLoRA's orthogonality term), or None.
        forward() adds it to `outputs.loss`; a loop that computes its own loss adds it itself."""
        extra = self._spec(self.active_adapter).extra_loss
        if extra is None or not self.training:
            return None
        return extra(self.get_base_model(), self.peft_config[self.active_adapter], self.active_adapter)

    def update_and_allocate(self, global_step: int) -> None:
        """Per-step bookkeeping of methods that need it (AdaLoRA's rank allocation); a no-op otherwise.
        slimtune's loop calls it after every optimizer step; with transformers.Trainer use
        slimtune's callback (see the method's docs)."""
        for name, config in self.peft_config.items():
            hook = get_method(config.peft_type).on_step
            if hook is not None and not config.inference_mode:
                hook(self.get_base_model(), config, name, global_step)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if (hooks := self._prompt_hooks()) is None:
            return self.get_base_model().generate(*args, **kwargs)
        if args:  # generate(input_ids, ...) as transformers allows
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("generate takes input_ids as its only positional argument")
            kwargs["input_ids"] = args[0]
        return hooks.generate(self.get_base_model(), self._prompt(), self.peft_config[self.active_adapter], kwargs)

    def _prompt_hooks(self) -> PromptHooks | None:
        """The active adapter's prompt hooks, unless it is a layer method or disable_adapter() is on."""
        return None if self._prompt_disabled else self._spec(self.active_adapter).prompt

    def _prompt(self) -> torch.Tensor:
        """The active prompt adapter's encoder output, (rows, dim)."""
        return self.prompt_encoder[self.active_adapter]()

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with adapter layers inside)."""
        return self.base_model.model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["base_model"], name)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    # ---- adapters -------------------------------------------------------------------------------
    def _spec(self, name: str) -> MethodSpec:
        return get_method(self.peft_config[name].peft_type)

    def _layers(self) -> Iterator[nn.Module]:
        return (m for m in self.modules() if (is_adapter_layer(m) or isinstance(m, ModulesToSave)))

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Inject a new adapter (inactive until set_adapter, like peft)."""
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a slimtune PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {sorted(self.peft_config)}")
        model = self.get_base_model()
        spec = get_method(peft_config.peft_type)
        if self.peft_config and (spec.prompt is None) != (self._spec(self.active_adapter).prompt is None):
            raise ValueError(
                f"cannot add a {peft_config.peft_type.value} adapter next to "
                f"{self.peft_config[self.active_adapter].peft_type.value}: prompt-learning and layer methods do not "
                "mix in one model (as in peft)")
        config = dataclasses.replace(peft_config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if config.task_type == TaskType.SEQ_CLS and hasattr(config, "modules_to_save"):
            present = [n for n in CLASSIFIER_NAMES if any(k.split(".")[-1] == n for k, _ in model.named_modules())]
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(present)) or None
        spec.inject(model, config, adapter_name, self._autocast_adapter_dtype)
        if spec.prompt is not None:
            device = next(model.parameters()).device
            self.prompt_encoder[adapter_name] = spec.prompt.build_encoder(model, config).to(device)
        self._add_modules_to_save(model, getattr(config, "modules_to_save", None), adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)  # the new adapter stays inactive and frozen

    def _add_modules_to_save(self, model: nn.Module, names: list[str] | None, adapter_name: str) -> None:
        if not names:
            return
        for name in find_targets(model, list(names)):
            if ".modules_to_save." in name or name.endswith(".original_module"):
                continue
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module)
            module.add(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter; only its weights require grad (unless inference_mode)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; adapters: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        config = self.peft_config[adapter_name]
        trainable = not config.inference_mode
        for param in self.get_base_model().parameters():
            param.requires_grad_(False)
        for layer in self._layers():
            layer.set_active([adapter_name], trainable)
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trainable and name == adapter_name)
        extra = self._spec(adapter_name).extra_trainable
        if trainable and extra is not None:
            for _, param in extra(self.get_base_model(), config):
                param.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; adapters: {sorted(self.peft_config)}")
        if adapter_name == self.active_adapter and len(self.peft_config) == 1:
            raise ValueError(f"cannot delete {adapter_name!r}: it is the only adapter")
        for layer in list(self._layers()):
            if adapter_name in (layer.adapters if is_adapter_layer(layer) else layer.modules_to_save):
                if is_adapter_layer(layer):
                    layer.delete(adapter_name)
                else:
                    del layer.modules_to_save[adapter_name]
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]
        if adapter_name == self.active_adapter:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        layers = list(self._layers())
        for layer in layers:
            layer.disabled = True
        self._prompt_disabled = True
        try:
            yield
        finally:
            self._prompt_disabled = False
            for layer in layers:
                layer.disabled = False

    # ---- merging --------------------------------------------------------------------------------
    def _refuse_prompt_merge(self, names: list[str]) -> None:
        prompt = [n for n in names if n in self.prompt_encoder]
        if prompt:
            raise ValueError(
                f"adapter {prompt[0]!r} is {self.peft_config[prompt[0]].peft_type.value}, a prompt-learning method: it "
                "adds virtual tokens and changes no weight, so there is nothing to merge; keep the PeftModel for "
                "inference, or use unload() to get the base model back")

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or [self.active_adapter]
        self._refuse_prompt_merge(names)
        for layer in self._layers():
            if is_adapter_layer(layer):
                layer.merge(names)

    def unmerge_adapter(self) -> None:
        for layer in self._layers():
            if is_adapter_layer(layer):
                layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain transformers model.

        A 4-bit base is dequantized and merged in its compute dtype (never re-quantized).
        """
        self._refuse_prompt_merge(adapter_names or [self.active_adapter])
        if adapter_names:
            for layer in self._layers():
                layer.set_active(adapter_names, trainable=False)
        return self._unload(merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the untouched base model."""
        return self._unload(merge=False, safe_merge=False)

    @torch.no_grad()
    def _unload(self, merge: bool, safe_merge: bool) -> nn.Module:
        model = self.get_base_model()
        wrapped = [(n, m) for n, m in model.named_modules() if (is_adapter_layer(m) or isinstance(m, ModulesToSave))]
        for name, layer in wrapped:
            if isinstance(layer, ModulesToSave):
                plain = layer.current() if merge else layer.original_module
            else:
                plain = layer.unloaded(merge=merge)
            if safe_merge and any(not torch.isfinite(p).all() for p in plain.parameters()):
                raise ValueError(f"merging produced NaN/inf weights in {name}; the adapter is broken")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
        update_quantization_config(model)  # merged 4-bit layers are plain now: config.json must say so
        return model

    # ---- trainable parameters -----------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total), counted as peft counts them (see count_parameters)."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ---- save / load ----------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's file keys."""
        name = adapter_name or self.active_adapter
        full = nn.Module.state_dict(self, keep_vars=True)
        extras = self._extra_keys(name)
        mapping = adapter_io.adapter_keys(full, name, extras)
        out = {file_key: full[key] for file_key, key in mapping.items()}
        if name in self.prompt_encoder:
            # peft's prompt-learning models hold the transformers model directly, without a tuner level: their
            # modules_to_save keys read `base_model.classifier...`, not `base_model.model.classifier...`
            out = {"base_model." + k.removeprefix(_PREFIX): v for k, v in out.items()}
            # a frozen StoredPrompt returns its own Parameter: loading copies into it
            prompt = self.prompt_encoder[name]()  # with autograd on, as peft: LSTM kernels differ under no_grad
            out["prompt_embeddings"] = prompt if isinstance(prompt, nn.Parameter) else prompt.detach()
        return out

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What state_dict() holds (see Note: state_dict() is the adapter)."""
        name = self.active_adapter
        out = self.adapter_state_dict(name)
        if name in self.prompt_encoder and not self.peft_config[name].inference_mode:
            del out["prompt_embeddings"]
            encoder = self.prompt_encoder[name].state_dict(keep_vars=True)
            out.update({f"prompt_encoder.{name}.{key}": value for key, value in encoder.items()})
        return out

    def _extra_keys(self, name: str) -> list[str]:
        extra = self._spec(name).extra_trainable
        return [_PREFIX + n for n, _ in extra(self.get_base_model(), self.peft_config[name])] if extra else []

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """Write each adapter in PEFT's layout: 'default' at the root, others in a subfolder."""
        if not safe_serialization:
            raise ValueError("slimtune writes safetensors only; safe_serialization=False is not supported")
        if not is_main_process:
            return
        root = Path(save_directory)
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                raise ValueError(f"adapter {name!r} not found; adapters: {sorted(self.peft_config)}")
            directory = root if name == "default" else root / name
            tensors, to_file = self.adapter_state_dict(name), self._spec(name).to_file
            adapter_io.write_weights(to_file(tensors, self.peft_config[name], name) if to_file else tensors, directory)
            config = dataclasses.replace(self.peft_config[name], inference_mode=True)
            config.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        autocast_adapter_dtype: bool = True, subfolder: str | None = None,
                        revision: str | None = None, **kwargs: Any) -> PeftModel:
        """Wrap `model` and load the adapter saved at `model_id` (a folder or a hub name)."""
        directory = adapter_io.resolve_adapter_dir(model_id, subfolder, revision)
        config = config or PeftConfig.from_pretrained(directory)
        _refuse_trainable_prompt(config, is_trainable)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        with adapter_errors(directory / adapter_io.CONFIG_NAME):
            peft_model = cls(model, config, adapter_name, autocast_adapter_dtype)
        peft_model._load_weights(directory, adapter_name)
        return peft_model if is_trainable else peft_model.eval()

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, revision: str | None = None, **kwargs: Any) -> None:
        """Add the adapter saved at `model_id` under `adapter_name` (inactive until set_adapter)."""
        directory = adapter_io.resolve_adapter_dir(model_id, subfolder, revision)
        config = PeftConfig.from_pretrained(directory)
        _refuse_trainable_prompt(config, is_trainable)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        with adapter_errors(directory / adapter_io.CONFIG_NAME):
            self.add_adapter(adapter_name, config)
        self._load_weights(directory, adapter_name)

    def _load_weights(self, directory: Path, adapter_name: str) -> None:
        file_sd = adapter_io.read_weights(directory)
        self._assign(file_sd, self.adapter_state_dict(adapter_name), source=str(directory / adapter_io.WEIGHTS_NAME))

    @torch.no_grad()
    def _assign(self, file_sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
        adapter_io.check_and_match(file_sd, expected, source)
        for key, tensor in file_sd.items():
            if key in expected:
                expected[key].data.copy_(tensor.to(expected[key].dtype))

    # ---- torch state-dict protocol (see Note: state_dict() is the adapter) ----------------------
    def state_dict(self, *args: Any, destination: dict | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        out = destination if destination is not None else {}
        run_state = {_RUN_STATE + k: v for k, v in self.method_state().items()}
        for key, tensor in {**self._checkpoint_state(), **run_state}.items():
            out[prefix + key] = tensor if keep_vars else tensor.detach()
        return out

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        tensors = dict(state_dict)
        run_state = {k.removeprefix(_RUN_STATE): tensors.pop(k) for k in list(tensors) if k.startswith(_RUN_STATE)}
        self._assign(tensors, self._checkpoint_state(), source="state_dict")
        self.load_method_state(run_state)
        return nn.modules.module._IncompatibleKeys([], [])

    def method_state(self) -> dict[str, torch.Tensor]:
        """The active method's training state outside its parameters (AdaLoRA's rank allocator), for checkpoints."""
        hooks, name = self._spec(self.active_adapter).run_state, self.active_adapter
        return hooks.get(self.get_base_model(), self.peft_config[name], name) if hooks else {}

    def load_method_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what method_state() returned (a method without run state accepts only {})."""
        hooks, name = self._spec(self.active_adapter).run_state, self.active_adapter
        if hooks is not None:
            hooks.load(self.get_base_model(), self.peft_config[name], name, tensors)
        elif tensors:
            raise ValueError(f"{self.peft_config[name].peft_type.value} keeps no run state, but the checkpoint has "
                             f"{', '.join(sorted(tensors)[:3])}; resume with the method it was trained with")


def _refuse_trainable_prompt(config: PeftConfig, is_trainable: bool) -> None:
    """A saved prompt adapter is its encoder's output only (see methods/prompt_learning/stored.py), as in peft."""
    if is_trainable and get_method(config.peft_type).prompt is not None:
        raise ValueError(
            f"cannot load a {config.peft_type.value} adapter with is_trainable=True: the file holds the prompt "
            "(its encoder's output), not the encoder; load it with is_trainable=False, or train a new adapter")


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, **kwargs: Any) -> PeftModel:
    """Wrap `model` with a new trainable adapter described by `peft_config`.

    Like peft, this injects adapter layers and changes nothing else; the fused RMSNorm/RoPE/SwiGLU
    forwards are a separate opt-in, `slimtune.enable_fast_path(model)`.
    """
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)


@contextlib.contextmanager
def adapter_errors(source: str | os.PathLike) -> Iterator[None]:
    """Name `source` (the adapter config) in the errors of building an adapter from it, and turn a failed
    allocation (an `r` or `num_virtual_tokens` far too large) into a ValueError instead of a traceback."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if str(source) in str(err):
            raise
        raise ValueError(f"{source}: {err}") from None
    except RuntimeError as err:  # torch.OutOfMemoryError is one; CPU allocators raise plain RuntimeErrors
        if not isinstance(err, torch.OutOfMemoryError) and "allocat" not in str(err):
            raise
        raise ValueError(f"{source}: the adapter does not fit in memory ({str(err).strip().splitlines()[0]}); "
                         "lower r (or num_virtual_tokens)") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of any model, as peft counts them.

    A packed 4-bit weight counts its 4-bit values: two per stored byte, whatever dtype holds the bytes
    (uint8, or bf16/fp32 after `Linear4bit.set_quant_storage`), so a QLoRA model has the total of its
    unquantized twin. Absmax scales and other quantization state are not parameters and are not counted.
    """
    packed = {id(m.weight) for m in model.modules() if isinstance(m, Linear4bit)}
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * param.element_size() * 2 if id(param) in packed else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
