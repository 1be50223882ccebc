"""RunConfig from YAML: key checking with suggestions, type coercion, overrides, cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slimtune.train.config import TrainConfig
from slimtune.train.docs import field_docs
from slimtune.train.methods import build_peft_config, method_spec
from slimtune.train.run_config import RunConfig, load_run_config, parse_overrides


def write(tmp_path: Path, raw: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


BASE = {"model": "m", "peft": {"r": 4}, "data": {"path": "t.jsonl"}, "train": {"max_steps": 3}, "output_dir": "o"}


def test_valid_config_types_and_defaults(tmp_path: Path) -> None:
    text = "model: m\ntrain: {lr: 1e-4, max_steps: 3, adam_betas: [0.8, 0.9]}\ndata: {path: t.jsonl}\n"
    (tmp_path / "r.yaml").write_text(text)
    cfg = load_run_config(tmp_path / "r.yaml")
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # PyYAML reads 1e-4 as a string
    assert cfg.train.adam_betas == (0.8, 0.9)
    assert (cfg.method, cfg.output_dir, cfg.train.batch_size, cfg.data.format) == ("lora", "runs/run", 4, "auto")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**BASE, "trian": {}}, "unknown key 'trian' in the top level; did you mean 'train'?"),
        ({**BASE, "train": {"learning_rate": 1}}, "unknown key 'learning_rate' in section 'train'"),
        ({**BASE, "train": {"batchsize": 1}}, "unknown key 'batchsize' in section 'train'; did you mean 'batch_size'?"),
        ({**BASE, "data": {"pth": "x"}}, "unknown key 'pth' in section 'data'; did you mean 'path'?"),
        ({**BASE, "peft": {"lora_alpah": 4}}, "unknown key 'lora_alpah' in section 'peft'; did you mean 'lora_alpha'?"),
        ({**BASE, "quant": {"typ": "nf4"}, "method": "qlora"}, "unknown key 'typ' in section 'quant'; did you mean 'type'?"),
        ({**BASE, "method": "lroa"}, "method 'lroa' is not a slimtune method; did you mean 'lora'? allowed: "),
        ({**BASE, "train": {"batch_size": "four"}}, "train.batch_size must be an integer; got 'four'"),
        ({**BASE, "train": {"precision": "fp8"}}, "train.precision must be one of auto, fp32, bf16, fp16; got 'fp8'"),
        ({**BASE, "train": {"lr": 0}}, "train.lr must be > 0 and finite, got 0.0"),
        ({**BASE, "train": {"warmup_steps": 3, "warmup_ratio": 0.1}}, "warmup_steps and train.warmup_ratio are exclusive"),
        ({**BASE, "train": {"early_stopping_patience": 2}}, "needs train.eval_every"),
        ({**BASE, "method": "full"}, "section 'peft' must be empty for method 'full'"),
        ({**BASE, "quant": {"type": "fp4"}}, "section 'quant' is used by method 'qlora' only"),
        ({**BASE, "method": "dora", "peft": {"use_dora": False}}, "peft.use_dora: method 'dora' needs use_dora=True"),
        ({"data": {"path": "x"}}, "missing required key 'model'"),
        ({**BASE, "data": {"format": "csvx"}}, "data.format='csvx' is not allowed"),
    ],
)
def test_errors_name_file_key_and_fix(tmp_path: Path, raw: dict, message: str) -> None:
    path = write(tmp_path, raw)
    with pytest.raises(ValueError) as err:
        load_run_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config file not found: .*nope.yaml"):
        load_run_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


def test_overrides_are_yaml_scalars_and_checked(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    cfg = load_run_config(path, ["--train.lr", "3e-4", "--train.max_steps=7", "--peft.target_modules", "[q_proj, v_proj]",
                                 "--output_dir", "runs/x", "--train.max_grad_norm", "null", "--data.packing", "true"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.max_grad_norm) == (3e-4, 7, None)
    assert cfg.peft["target_modules"] == ["q_proj", "v_proj"] and cfg.output_dir == "runs/x" and cfg.data.packing
    with pytest.raises(ValueError, match=r"unknown override --trian.lr: the top level has no key 'trian'; "
                                         r"did you mean --train.lr\?"):
        load_run_config(path, ["--trian.lr", "1"])
    with pytest.raises(ValueError, match=r"unknown override --train.lrr: section 'train' has no key 'lrr'; "
                                         r"did you mean --train.lr\?"):
        load_run_config(path, ["--train.lrr", "1"])
    with pytest.raises(ValueError, match="override --train.lr needs a value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ValueError, match="expected an override like --train.lr 1e-4, got 'lr'"):
        parse_overrides(["lr", "1"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, {**BASE, "train": {"lr": 1e-3, "adam_betas": [0.9, 0.95]}}))
    cfg.save(tmp_path / "resolved.yaml")
    again = load_run_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert again.to_dict()["train"]["adam_betas"] == [0.9, 0.95]


def test_every_train_field_has_help() -> None:
    docs = field_docs(TrainConfig)
    missing = [f for f in TrainConfig.__dataclass_fields__ if not docs.get(f)]
    assert missing == []
    assert docs["lr"] == "Peak learning rate of AdamW (reached after warmup)."


def test_method_table() -> None:
    assert method_spec("full").config_class is None
    dora = build_peft_config("dora", {"r": 4})
    assert dora.use_dora is True and dora.r == 4 and str(getattr(dora.task_type, "value", dora.task_type)) == "CAUSAL_LM"
    with pytest.raises(ValueError, match="method 'dora' needs use_dora=True; got False"):
        build_peft_config("dora", {"use_dora": False})
    assert method_spec("qlora").quantized and not method_spec("lora").quantized
    assert type(build_peft_config("prefix_tuning", {"num_virtual_tokens": 4})).__name__ == "PrefixTuningConfig"


def test_run_config_requires_valid_dataclass_sections() -> None:
    with pytest.raises(ValueError, match="section 'train' must be a mapping"):
        RunConfig.from_dict({**BASE, "train": [1, 2]})
