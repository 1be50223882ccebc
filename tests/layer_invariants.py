"""The invariants every layer method (LoRA, IA3, AdaLoRA) keeps, with HF peft as the oracle, and the helpers their
suites share (tests/test_lora_invariants.py, tests/methods/test_ia3.py, tests/methods/test_adalora.py).

Each suite keeps its own table of config cases; these functions take a tiny model name and configs from it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn

import slimtune
from slimtune.adapter_layer import is_adapter_layer
from tiny_models import TINY_MODELS, logits

TOL = dict(rtol=1e-4, atol=1e-5)


def case_kwargs(cases: dict[str, dict[str, Any]], model_name: str, case: str, **extra: Any) -> dict[str, Any]:
    """A case's config arguments for one tiny model: its task type, and fan_in_fan_out for Conv1D (GPT-2)."""
    kwargs = dict(cases[case], task_type=TINY_MODELS[model_name].task_type, **extra)
    if TINY_MODELS[model_name].conv1d:
        kwargs["fan_in_fan_out"] = True
    return kwargs


def pair(model_name: str, ours_config: Any, theirs_config: Any) -> tuple[nn.Module, nn.Module]:
    """(slimtune model, peft model) built from the same base weights with the same seed, in eval mode.

    Warnings are silenced: cases make some choices on purpose that both libraries warn about (fan_in_fan_out
    corrected for Conv1D, patterns that match no module, no per-architecture default)."""
    tiny = TINY_MODELS[model_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        ours = slimtune.get_peft_model(tiny.model(), ours_config)
        torch.manual_seed(1)
        theirs = peft.get_peft_model(tiny.model(), theirs_config)
    return ours.eval(), theirs.eval()


def perturb(model: nn.Module, seed: int = 7, scale: float = 0.1) -> None:
    """Move every trainable tensor away from its init (so that B != 0) and the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def file_key(name: str) -> str:
    """A slimtune parameter name as peft's file writes it (see adapter_layer.py, Note: adapter naming on disk)."""
    return name.replace(".adapters.default.", ".").replace(".modules_to_save.default.", ".")


def assert_same_as_peft(ours: nn.Module, theirs: nn.Module, theirs_sd: dict[str, torch.Tensor],
                        inputs: dict[str, torch.Tensor], **logits_tol: float) -> None:
    """Bit-identical adapter tensors under the same file keys, the same logits, the same trainable parameters."""
    ours_sd = ours.adapter_state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), **logits_tol)
    ours_trainable = sorted(file_key(n) for n, p in ours.named_parameters() if p.requires_grad)
    theirs_trainable = sorted(n.replace(".default", "").replace(".modules_to_save", "")
                              .replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                              for n, p in theirs.named_parameters() if p.requires_grad)
    assert ours_trainable == theirs_trainable


def assert_files_load_both_ways(ours: nn.Module, theirs: nn.Module, model_name: str, tmp_path: Path,
                                scale: float = 0.1) -> dict[str, Any]:
    """Perturbed adapters saved by either library load in the other with the same logits, and ours load frozen.
    Returns the adapter_config.json we wrote, after checking peft's config class knows all its fields."""
    tiny = TINY_MODELS[model_name]
    inputs = tiny.inputs()
    perturb(ours, scale=scale)
    expected = logits(ours, inputs)
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_fields = set(type(theirs.peft_config["default"]).__dataclass_fields__)
    assert set(written) <= peft_fields, set(written) - peft_fields
    loaded_in_peft = peft.PeftModel.from_pretrained(tiny.model(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded_in_peft, inputs), expected)

    perturb(theirs, seed=11, scale=scale)
    expected = logits(theirs, inputs)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_in_ours = slimtune.PeftModel.from_pretrained(tiny.model(), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(loaded_in_ours, inputs), expected)
    assert not any(p.requires_grad for p in loaded_in_ours.parameters()), "inference mode loads frozen"
    return written


def assert_merge_disable_unload(model_name: str, config: Any, scale: float = 0.1,
                                disable_is_base: bool = True) -> None:
    """A perturbed adapter changes the logits; disabled, the model is the base again, merged or not (a merged
    layer unmerges itself when disabled, as in peft); merge == unmerged; merge_and_unload leaves no wrapper.

    disable_is_base=False skips the disabled checks, for configs that train base tensors in place (bias='all').
    """
    tiny = TINY_MODELS[model_name]
    inputs = tiny.inputs()
    base_logits = logits(tiny.model(), inputs)
    model = slimtune.get_peft_model(tiny.model(), config).eval()
    perturb(model, scale=scale)
    adapted = logits(model, inputs)
    assert (adapted - base_logits).abs().max() > 1e-3, "the perturbed adapter must change the output"
    if disable_is_base:
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, inputs), base_logits)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, **TOL)
    if disable_is_base:
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, inputs), base_logits, **TOL)
        model.merge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, **TOL)
    merged = model.merge_and_unload()
    assert not any(is_adapter_layer(m) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, **TOL)


def assert_step_leaves_base_untouched(model_name: str, config: Any, adapter_key: str) -> dict[str, torch.Tensor]:
    """Only adapter tensors (names holding `adapter_key`) and modules_to_save copies train, and an SGD step on
    them leaves every base tensor bit-identical after unload(). Returns the trained tensors' gradients by name."""
    tiny = TINY_MODELS[model_name]
    base = tiny.model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = slimtune.get_peft_model(base, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(adapter_key in n or ".modules_to_save.default." in n for n in trainable)
    model(**tiny.inputs()).logits.float().pow(2).mean().backward()
    torch.optim.SGD(list(trainable.values()), lr=0.1).step()
    for key, value in model.unload().state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    return {n: p.grad for n, p in trainable.items()}
