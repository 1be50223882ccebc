"""Every adapter method, one row per `method:` name of a run. Adding a method adds a folder and one row here.

A row names the method package's `MethodSpec` (methods/spec.py) and how a run uses it: qlora is LoRA on a
base model loaded in 4 bit, dora is LoRA with `use_dora=True`, full trains every parameter and has no
method. The peft-compatible API finds a method by the `peft_type` of its config (`get_method`); the run
pipeline (train/methods.py) by the row's name. Method packages are imported here, so an error inside one
surfaces as itself, with its traceback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimtune.config import PeftConfig, PeftType
from slimtune.methods import adalora, ia3, lora, p_tuning, prefix_tuning, prompt_tuning
from slimtune.methods.spec import MethodSpec

__all__ = ["METHODS", "RunMethod", "get_method"]


@dataclasses.dataclass(frozen=True)
class RunMethod:
    """What one `method:` name of a run builds."""

    spec: MethodSpec | None
    """The adapter method; None for full fine-tuning (every parameter trains, no adapter)."""
    forced: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Config fields this method sets itself (the user may repeat them, not contradict them)."""
    quantized: bool = False
    """Load the frozen base model in 4 bit (QLoRA)."""

    @property
    def config_class(self) -> type[PeftConfig] | None:
        """The adapter config class the run's `peft:` section builds; None for full fine-tuning."""
        return None if self.spec is None else self.spec.config_cls


METHODS: dict[str, RunMethod] = {
    "lora": RunMethod(lora.METHOD),
    "qlora": RunMethod(lora.METHOD, quantized=True),
    "dora": RunMethod(lora.METHOD, forced={"use_dora": True}),
    "adalora": RunMethod(adalora.METHOD),
    "ia3": RunMethod(ia3.METHOD),
    "prefix_tuning": RunMethod(prefix_tuning.METHOD),
    "prompt_tuning": RunMethod(prompt_tuning.METHOD),
    "p_tuning": RunMethod(p_tuning.METHOD),
    "full": RunMethod(None),
}

_BY_PEFT_TYPE: dict[PeftType, MethodSpec] = {
    row.spec.config_cls.peft_type: row.spec for row in METHODS.values() if row.spec is not None}


def get_method(peft_type: PeftType) -> MethodSpec:
    """The MethodSpec of an adapter config's `peft_type` (every PeftType has a row in METHODS)."""
    return _BY_PEFT_TYPE[peft_type]
