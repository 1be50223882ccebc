"""Fuzzing the run YAML (`load_run_config`) and `slimtune train` on bad configs.

A generated config (a valid one with keys added, dropped or given odd values, or raw YAML text, plus
`--section.key value` overrides) ends in a RunConfig whose values are in range, or a ValueError naming
the file; through the CLI, exit code 2 and one `error:` line. The bugs this fuzzing found are fixed and
pinned by the regression tests at the end; no exception type is filtered out of the fuzz run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from reliability_tools import count, fuzz_settings, time_limit
from typer.testing import CliRunner

from slimtune.train.run_config import RunConfig, load_run_config

VALID = {
    "model": "/nonexistent/model", "method": "lora", "peft": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "data": {"path": "/nonexistent/rows.jsonl", "format": "auto", "eval_split": 0.1},
    "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "seed": 0, "save_every": 2, "precision": "fp32",
              "warmup_ratio": 0.1, "adam_betas": [0.9, 0.99]},
    "quant": {"type": "nf4"},
    "output_dir": "runs/x",
}
SECTIONS = ["peft", "data", "train", "quant"]
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "1e-4", "nan", ".inf", "-1", "yes", "~", "null",
                                                       "all-linear", "qlora", "../../etc", "\x00", "床"]))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
KEY = st.one_of(TEXT, st.sampled_from(["lr", "lrr", "r", "max_steps", "epochs", "batch_size", "path", "format",
                                       "type", "double_quant", "eval_every", "early_stopping_patience",
                                       "keep_checkpoints", "warmup_steps", "adam_betas", "max_grad_norm"]))
EDIT = st.tuples(st.sampled_from(["set", "drop", "add"]), st.sampled_from(["", *SECTIONS]), KEY, VALUE)


def _apply(raw: dict, edits: list[tuple[str, str, str, object]]) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(raw))
    for op, section, key, value in edits:
        node = raw if not section else raw.setdefault(section, {})
        if not isinstance(node, dict):
            continue
        if op == "drop":
            node.pop(key if key in node else next(iter(node), None), None)
        elif op == "set" and node:
            node[key if key in node else list(node)[hash(key) % len(node)]] = value
        else:
            node[key] = value
    return raw


def _check_config(cfg: RunConfig) -> None:
    """An accepted config holds values training can use."""
    t = cfg.train
    assert all(math.isfinite(getattr(t, k)) for k in ("lr", "weight_decay")), (t.lr, t.weight_decay)
    assert t.max_grad_norm is None or math.isfinite(t.max_grad_norm), t.max_grad_norm
    assert t.lr > 0 and t.batch_size >= 1 and t.save_every >= 1 and t.keep_checkpoints >= 1
    assert isinstance(cfg.model, str) and cfg.model and isinstance(cfg.output_dir, str)
    assert isinstance(cfg.data.path, str) and cfg.data.path.strip()


def _load(path: Path, overrides: list[str]) -> RunConfig | None:
    try:
        with time_limit(10):
            return load_run_config(path, overrides)
    except ValueError as err:
        assert str(path) in str(err) or "override" in str(err) or "config file" in str(err), str(err)
        return None


OVERRIDE = st.tuples(st.sampled_from(["train.lr", "train.max_steps", "data.path", "peft.r", "quant.type", "model",
                                      "train", "nosuch.key", "train.lrr", "output_dir", "method", "peft"]),
                     st.one_of(TEXT, st.sampled_from(["[1, 2]", "{a: 1}", "1e-4", "-3", "nan", "''", ": bad"])))


@given(edits=st.lists(EDIT, max_size=5), overrides=st.lists(OVERRIDE, max_size=3), dangling=st.booleans())
@fuzz_settings(300)
def test_fuzz_run_config_dicts(tmp_path_factory: pytest.TempPathFactory, edits: list, overrides: list,
                               dangling: bool) -> None:
    count("run_config")
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump(_apply(VALID, edits), allow_unicode=True))
    args = [a for k, v in overrides for a in (f"--{k}", v)] + (["--train.seed"] if dangling else [])
    cfg = _load(path, args)
    if cfg is not None:
        _check_config(cfg)


@given(text=st.one_of(st.text(max_size=200), st.sampled_from([
    "model: [", "- a\n- b", "model: x\ndata: 3", "!!python/object:os.system {}", "model: !!binary AAAA",
    "&a [*a]", "model: x\n" + "  " * 500 + "y: 1", "a: " + "[" * 2000, "? [a, b]\n: 1", "\t- tab", "%YAML 9.9\n---",
    "model: m\ndata: {path: p}\ntrain: {lr: .nan}", "model: m\ndata: {path: p}\ntrain: {lr: .inf}",
])), overrides=st.lists(OVERRIDE, max_size=2))
@fuzz_settings(200)
def test_fuzz_run_config_text(tmp_path_factory: pytest.TempPathFactory, text: str, overrides: list) -> None:
    count("run_config_text")
    path = tmp_path_factory.mktemp("cfgtext") / "run.yaml"
    path.write_text(text, errors="surrogatepass")
    cfg = _load(path, [a for k, v in overrides for a in (f"--{k}", v)])
    if cfg is not None:
        _check_config(cfg)


@given(edits=st.lists(EDIT, min_size=1, max_size=3))
@fuzz_settings(40)
def test_fuzz_cli_bad_configs_exit_2_with_one_line(tmp_path_factory: pytest.TempPathFactory, edits: list) -> None:
    """Through `slimtune train` (in-process): the model path does not exist, so every config fails fast."""
    from slimtune.cli.main import app

    count("run_config_cli")
    root = tmp_path_factory.mktemp("cli")
    path = root / "run.yaml"
    raw = _apply(VALID, edits)
    if isinstance(raw, dict) and isinstance(raw.get("output_dir"), str):
        raw["output_dir"] = str(root / "out")
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    with time_limit(30):
        result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and "Traceback" not in result.output


# ---- regression tests for the bugs this fuzzing found in src/slimtune/train/run_config.py ----
def test_config_without_data_section(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: m\n")
    assert load_run_config(path).data.path == "slimtune:wordnet_instruct"


def test_config_that_is_a_list_with_an_override(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_run_config(path, ["--train.lr", "1"])


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_non_finite_learning_rate_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ndata: {{path: p.jsonl}}\ntrain: {{lr: {value}}}\n")
    with pytest.raises(ValueError, match="lr"):
        load_run_config(path)


def test_deeply_nested_yaml_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("a: " + "[" * 2000)
    with pytest.raises(ValueError, match="YAML"):
        load_run_config(path)


# ---- strict YAML and values that poison a run (Note: strict YAML, slimtune/strict_yaml.py) --------------------------
def _laughs(levels: int) -> str:
    """Nested anchors: each level lists the previous one 9 times (9**levels strings once expanded)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "model: /m\n" + "\n".join(lines) + "\n"


YAML_ATTACKS = {
    "billion laughs": (_laughs(9), "anchor &a0 is not allowed"),
    "alias only": ("model: &m /m\noutput_dir: *m\n", "anchor &m is not allowed"),
    "merge key": ("base: &b {lr: 1}\ntrain:\n  <<: *b\n", "anchor &b is not allowed"),
    "duplicate key": ("model: /m\ntrain:\n  lr: 1.0e-3\n  lr: 1.0e-2\n", "line 4, column 3: key 'lr' is given twice"),
    "duplicate section": ("model: /m\ntrain: {lr: 1.0e-3}\ntrain: {seed: 3}\n", "line 3, column 1: key 'train' is given"),
    "duplicate top key": ("model: /a\nmodel: /b\n", "key 'model' is given twice"),
    "weight_decay nan": ("model: /m\ntrain: {weight_decay: .nan}\n", "train.weight_decay must be a finite number"),
    "weight_decay inf": ("model: /m\ntrain: {weight_decay: .inf}\n", "train.weight_decay must be a finite number"),
    "warmup_ratio nan": ("model: /m\ntrain: {warmup_ratio: .nan}\n", "train.warmup_ratio must be a finite number"),
    "eval_split nan": ("model: /m\ndata: {eval_split: .nan}\n", "data.eval_split must be a finite number"),
    "adam_betas inf": ("model: /m\ntrain: {adam_betas: [.inf, 0.9]}\n", "train.adam_betas[0] must be a finite"),
    "lora_alpha inf": ("model: /m\npeft: {lora_alpha: .inf}\n", "peft.lora_alpha=inf must be a finite number"),
    "lora_dropout nan": ("model: /m\npeft: {lora_dropout: .nan}\n", "peft.lora_dropout=nan must be a finite"),
    "string boolean": ("model: /m\npeft: {use_rslora: 'false'}\n", "peft.use_rslora='false' must be true or false"),
    "catastrophic regex": ("model: /m\npeft: {target_modules: '([a-z_.0-9]+)+!'}\n", None),
    "invalid regex": ("model: /m\npeft: {target_modules: '(q_proj'}\n", "peft.target_modules='(q_proj' is not a valid"),
    "invalid pattern key": ("model: /m\npeft: {rank_pattern: {'[': 4}}\n", "peft.rank_pattern key='[' is not a valid"),
    "seed 1e23": ("model: /m\ntrain: {seed: 1.0e+23}\n", "train.seed must be an integer"),
    "seed -1": ("model: /m\ntrain: {seed: -1}\n", "train.seed must be an integer in [0, 2**63 - 1]"),
    "seed 2**64": ("model: /m\ntrain: {seed: 18446744073709551616}\n", "train.seed must be an integer in [0, 2**63"),
    "empty target_modules": ("model: /m\npeft: {target_modules: []}\n", "peft.target_modules is empty"),
    "data name ../..": ("model: /m\ndata: {path: 'slimtune:../../etc'}\n", "data.path='slimtune:../../etc'"),
    "data eval name ..": ("model: /m\ndata: {path: r.jsonl, eval_path: 'slimtune:..'}\n", "data.eval_path='slimtune:.."),
}


@pytest.mark.parametrize("attack", sorted(YAML_ATTACKS))
def test_run_yaml_attacks_are_one_clear_error(tmp_path: Path, attack: str) -> None:
    text, message = YAML_ATTACKS[attack]
    path = tmp_path / "run.yaml"
    path.write_text(text)
    count("run_yaml_attacks")
    with time_limit(10):
        if message is None:  # a pattern that is bounded, not refused: it loads, and matching it cannot hang
            load_run_config(path)
            return
        with pytest.raises(ValueError) as err:
            load_run_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text
    assert len(text) < 600, "the message must not print an expanded value"


def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(b"model: /m\ntrain:\n  lr: 1.0e-3 # caf\xe9\n")
    with pytest.raises(ValueError, match=rf"^{path}: not UTF-8 text: byte 0xe9 at byte offset 35 \(line 3\)"):
        load_run_config(path)


def test_yaml_attacks_through_the_cli_stop_before_the_model_loads(tmp_path: Path) -> None:
    """`model: /nonexistent` would fail when the model loads: each error here must come first."""
    from slimtune.cli.main import app

    for name in ("billion laughs", "duplicate section", "seed -1", "weight_decay nan", "string boolean"):
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(YAML_ATTACKS[name][0].replace("/m\n", "/nonexistent/model\n", 1))
        with time_limit(30):
            result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and output.startswith("error:") and "Traceback" not in result.output, output
        assert "nonexistent/model" not in output.split(":", 2)[-1] or "cannot load" not in output, output
