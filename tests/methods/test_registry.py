"""registry.METHODS: one row per run method, the peft API's lookup by peft_type, import errors shown as they are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import slimtune
from slimtune.config import PeftConfig, PeftType
from slimtune.registry import METHODS, get_method

SRC = Path(__file__).resolve().parents[2] / "src"
REQUIRED = {PeftType.ADALORA: {"total_step": 10}, PeftType.PROMPT_TUNING: {"num_virtual_tokens": 2},
            PeftType.PREFIX_TUNING: {"num_virtual_tokens": 2}, PeftType.P_TUNING: {"num_virtual_tokens": 2}}


@pytest.mark.parametrize("peft_type", list(PeftType))
def test_every_peft_type_has_one_method(peft_type: PeftType) -> None:
    spec = get_method(peft_type)
    assert spec.config_cls.peft_type is peft_type
    data = {"peft_type": peft_type.value, **REQUIRED.get(peft_type, {})}
    assert type(PeftConfig.from_dict(data)) is spec.config_cls


def test_run_methods_share_the_peft_api_rows() -> None:
    assert METHODS["qlora"].spec is METHODS["dora"].spec is METHODS["lora"].spec is get_method(PeftType.LORA)
    assert (METHODS["qlora"].quantized, METHODS["qlora"].forced) == (True, {})
    assert (METHODS["dora"].quantized, METHODS["dora"].forced) == (False, {"use_dora": True})
    assert METHODS["full"].spec is None and METHODS["full"].config_class is None
    exported = {getattr(slimtune, name) for name in slimtune.__all__}
    assert {row.config_class for row in METHODS.values() if row.spec} <= exported


def test_an_import_error_inside_a_method_package_shows_its_traceback() -> None:
    """A broken import in a method's folder is a bug: it must read as itself, never as 'not available'."""
    code = ("import sys; sys.modules['slimtune.methods.prefix_tuning.encoder'] = None; "
            "from slimtune import PeftType; from slimtune.registry import get_method; "
            "get_method(PeftType.PREFIX_TUNING)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ModuleNotFoundError: import of slimtune.methods.prefix_tuning.encoder halted" in done.stderr
    assert "not available" not in done.stderr
