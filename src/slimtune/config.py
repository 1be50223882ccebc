"""Adapter configuration: the PeftConfig base, TaskType/PeftType, and JSON in PEFT's schema.

An adapter folder holds `adapter_config.json` exactly as HF peft writes it, so files move freely
between slimtune, peft, vLLM and the rest. Each method's config is a dataclass that subclasses
PeftConfig (dataclass field inheritance only: the behaviour lives in the method's folder).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any, ClassVar

from slimtune.config_checks import FieldTypeError, check_fields

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class TaskType(str, enum.Enum):
    """What the wrapped model does; decides defaults such as modules_to_save for classifiers."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """The adapter method, as written in adapter_config.json's `peft_type`."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"


def coerce_enum(enum_cls: type[enum.Enum], value: Any, field: str) -> Any:
    """`value` as a member of `enum_cls` (None stays None); ValueError naming `field` and the allowed values."""
    if value is None or isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).upper())
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"{field}={value!r} is not valid; allowed: {allowed}") from None


# Fields that peft writes for features slimtune does not implement. A file holding any of them at its
# default (or empty) value loads fine; any other value is refused, never silently dropped.
_PEFT_FIELDS_AT_DEFAULT: dict[str, Any] = {
    "auto_mapping": None, "peft_version": None, "megatron_config": None, "megatron_core": "megatron.core",
    "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "layer_replication": None, "runtime_config": None, "lora_bias": False,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False, "trainable_token_indices": None,
}
_METADATA_FIELDS = {"auto_mapping", "peft_version", "runtime_config"}
_USER_ERRORS = (ValueError, TypeError, FieldTypeError)


@dataclasses.dataclass
class PeftConfig:
    """Fields every adapter method shares (PEFT's names and meaning)."""

    task_type: TaskType | str | None = None
    """What the model does: CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION."""
    base_model_name_or_path: str | None = None
    """Name or path of the base model the adapter was trained on (filled in on save)."""
    revision: str | None = None
    """Hub revision of the base model, if any."""
    inference_mode: bool = False
    """True when the adapter is loaded frozen, for inference."""

    peft_type: ClassVar[PeftType]

    def __post_init__(self) -> None:
        self.task_type = coerce_enum(TaskType, self.task_type, "task_type")
        check_fields(self)  # types, finite numbers, patterns: before any method's own checks

    # ---- (de)serialization in PEFT's schema -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as adapter_config.json: PEFT's field names, enums as strings."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        out["peft_type"] = self.peft_type.value
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PeftConfig:
        """Build the config of the method named by data['peft_type'] (or cls itself for a subclass)."""
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        if cls is PeftConfig:
            if peft_type is None:
                raise ValueError(f"{source}: missing 'peft_type'; allowed: {', '.join(t.value for t in PeftType)}")
            cls = _config_class(coerce_enum(PeftType, peft_type, f"{source}: peft_type"))
        elif peft_type is not None and coerce_enum(PeftType, peft_type, "peft_type") != cls.peft_type:
            raise ValueError(f"{source}: peft_type={peft_type!r} but {cls.__name__} expects {cls.peft_type.value}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_FIELDS_AT_DEFAULT:
                if key not in _METADATA_FIELDS and value not in (_PEFT_FIELDS_AT_DEFAULT[key], None, {}, [], False):
                    raise ValueError(
                        f"{source}: field {key!r}={value!r} asks for a peft feature slimtune does not support; "
                        f"only the default {_PEFT_FIELDS_AT_DEFAULT[key]!r} is accepted"
                    )
            else:
                raise ValueError(
                    f"{source}: unknown field {key!r} for {cls.__name__}; allowed: {', '.join(sorted(known))}"
                )
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as err:
            kind = type(err) if type(err) in _USER_ERRORS else ValueError  # subclasses may take other arguments
            raise kind(f"{source}: {err}") from None

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write adapter_config.json into save_directory (atomically: write, then rename)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PeftConfig:
        """Read adapter_config.json from a local adapter folder."""
        file = Path(directory) / CONFIG_NAME
        if not file.is_file():
            raise ValueError(f"{file}: no adapter config found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except RecursionError:
            raise ValueError(f"{file}: not usable JSON (nested too deeply)") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise ValueError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(file))


def _config_class(peft_type: PeftType) -> type[PeftConfig]:
    """The config class that declares `peft_type`: the subclass of PeftConfig nearest to it (importing slimtune
    imports every method's config class; registry.py lists the methods)."""
    pending = list(PeftConfig.__subclasses__())
    while pending:
        cls = pending.pop(0)
        if cls.__dict__.get("peft_type") is peft_type:
            return cls
        pending.extend(cls.__subclasses__())
    raise AssertionError(f"no config class declares peft_type {peft_type.value}")
