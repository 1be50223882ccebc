"""Every shipped examples/*.yaml parses as a RunConfig and builds its method's config, field by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimtune.registry import METHODS
from slimtune.train.methods import build_peft_config, method_spec
from slimtune.train.run_config import load_run_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_every_method_has_an_example() -> None:
    assert {p.stem for p in EXAMPLES} >= set(METHODS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses_and_builds(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.method == path.stem
    assert cfg.output_dir.startswith("runs/")
    if method_spec(cfg.method).config_class is None:
        assert cfg.peft == {}
        return
    peft_config = build_peft_config(cfg.method, cfg.peft, total_steps=100)
    for key, value in cfg.peft.items():
        assert getattr(peft_config, key) == value or key == "target_modules"
