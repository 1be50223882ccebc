"""Every shipped examples/*.yaml parses as a RunConfig and builds its method's config.

Methods slimtune does not export yet (adalora, ia3, prefix/prompt/p-tuning while missing) must raise
MethodUnavailable naming the method, and their `peft:` keys are checked against HF peft's class of the
same name (slimtune mirrors peft's config names), so the files are right the day the method lands.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slimtune.train.methods import METHODS, MethodUnavailable, build_peft_config, method_spec
from slimtune.train.run_config import load_run_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_every_method_has_an_example() -> None:
    assert {p.stem for p in EXAMPLES} >= set(METHODS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses_and_builds(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.method == path.stem
    assert cfg.output_dir.startswith("runs/")
    spec = method_spec(cfg.method)
    if spec.config_class is None:
        assert cfg.peft == {}
        return
    try:
        peft_config = build_peft_config(cfg.method, cfg.peft, total_steps=100)
    except MethodUnavailable as err:
        assert f"method '{cfg.method}' is not available yet" in str(err)
        hf_peft = pytest.importorskip("peft")
        fields = {f.name for f in dataclasses.fields(getattr(hf_peft, spec.config_class))}
        assert set(cfg.peft) <= fields
        return
    for key, value in cfg.peft.items():
        assert getattr(peft_config, key) == value or key == "target_modules"
