"""benchmarks/method_comparison.py on the tiny Llama: the base row and 2 methods x 2 steps are real rows.

The script's core (`measure`) trains through run_training exactly as on SmolLM2; here the rows are
checked against what the model and the files say: parameter counts against get_peft_model on a
fresh copy, the adapter size against the file on disk, LoRA's "before" against the untouched base.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
from tiny_run import write_alpaca

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "method_comparison.py"
PROMPT = [{"role": "user", "content": "What does river mean?"}]


@functools.cache
def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("method_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    mc = load_script()
    root = tmp_path_factory.mktemp("method-comparison")
    train, held_out = write_alpaca(root / "train.jsonl", 32), write_alpaca(root / "eval.jsonl", 8, offset=5)
    budget = mc.Budget(steps=2, batch=4, seq=64, seed=0)
    return {m: dict(mc.measure(m, str(tiny_model_dir), str(train), str(held_out), root, budget, PROMPT), root=root)
            for m in ("base", "lora", "prompt_tuning")}


def expected_counts(method: str, model_dir: Path) -> tuple[int, int]:
    from transformers import AutoModelForCausalLM

    from slimtune import get_peft_model
    from slimtune.train.methods import build_peft_config

    mc = load_script()
    cfg = mc.run_config(method, str(model_dir), "unused.jsonl", "unused.jsonl", Path("unused"), mc.Budget(steps=2))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, build_peft_config(method, cfg.peft, 2)).get_nb_trainable_parameters()


def test_base_row_is_the_untouched_model(rows: dict[str, dict], tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = rows["base"]
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert (base["trainable"], base["total"], base["lr"]) == (0, total, None)
    assert "after" not in base and not (base["root"] / "base" / "checkpoints").exists()  # nothing trained
    assert 4.0 < base["before"] < 7.5  # ln(320) = 5.77 for a random model
    # LoRA starts with B = 0: its "before" is the base model's loss, to float precision
    assert rows["lora"]["before"] == pytest.approx(base["before"], abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_method_rows_are_real(rows: dict[str, dict], tiny_model_dir: Path, method: str) -> None:
    row, base = rows[method], rows["base"]
    assert (row["trainable"], row["total"]) == expected_counts(method, tiny_model_dir)
    assert 0 < row["trainable"] < row["total"]
    assert row["steps"] == 2 and row["lr"] == load_script().METHODS[method].lr
    for key in ("before", "after", "first_loss", "last_loss", "s_per_step", "peak_rss_gb"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert abs(row["after"] - row["before"]) > 1e-4 and abs(row["after"] - base["before"]) > 1e-4
    adapter = row["root"] / method / "adapter" / "adapter_model.safetensors"
    assert row["artifact_mb"] == pytest.approx(adapter.stat().st_size / 2**20)
    assert isinstance(row["answer"], str)


def test_soft_prompt_changes_the_starting_loss(rows: dict[str, dict]) -> None:
    # 20 virtual tokens from the init text sit before every row: "before" is not the base loss
    assert abs(rows["prompt_tuning"]["before"] - rows["base"]["before"]) > 1e-4


def test_table_shows_missing_numbers_and_failures() -> None:
    mc = load_script()
    ok = {"method": "ia3", "lr": 0.03, "trainable": 10, "total": 1000, "before": 2.0, "after": None,
          "s_per_step": 1.5, "peak_rss_gb": 1.0, "artifact_mb": 0.1, "answer": "a | b " + "x" * 100}
    base = {"method": "base", "lr": None, "trainable": 0, "total": 1000, "before": 2.0, "peak_rss_gb": 1.0,
            "answer": "hello"}
    lines = mc.format_table([base, ok, {"method": "qlora", "error": "boom"}]).splitlines()
    assert len(lines) == 5
    assert "| base | - | 0 (0%) | 2.000 | 7.39 | - |" in lines[2]
    assert "2.000 -> n/a | 7.39 -> n/a" in lines[3] and "a \\| b" in lines[3] and lines[3].endswith("... |")
    assert lines[4].startswith("| qlora | failed: boom")
    with pytest.raises(ValueError, match="allowed: base, lora"):
        mc.measure("lorax", "m", "t", "e", Path("w"), mc.Budget(), PROMPT)
