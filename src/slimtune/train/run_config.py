"""RunConfig: the whole run YAML (model, method, peft, data, train, quant, output_dir) as one dataclass.

`load_run_config(path, overrides)` reads the YAML, applies `--section.key value` overrides (values
parsed as YAML scalars), rejects unknown keys at every level with the closest valid name, and builds
the typed sections: `train` -> TrainConfig, `data` -> slimtune.data.DataConfig, `quant` -> QuantConfig,
`peft` -> checked against the method's config class (built later by `methods.build_peft_config`).
Relative paths are relative to the current directory, as in every shell tool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from slimtune.models import DEFAULT_MODEL, check_model_name
from slimtune.strict_yaml import load_yaml, load_yaml_text
from slimtune.train.config import TrainConfig
from slimtune.train.methods import METHODS, check_peft_section, method_spec
from slimtune.train.schema import UnknownKeyError, check_keys, closest_key, coerce, from_mapping, to_plain


def _data_config_class() -> type:
    from slimtune.data import DataConfig  # the data pipeline's own section

    return DataConfig


@dataclass
class QuantConfig:
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base weights (qlora only): nf4 (NormalFloat) or fp4."""
    double_quant: bool = True
    """Quantize the per-block scales too (saves ~0.4 bit per weight)."""


@dataclass
class RunConfig:
    model: str
    """Base model: a local folder in Hugging Face format, a hub name, or slimtune:smollm2-135m-instruct
    (SmolLM2-135M-Instruct, shipped with slimtune and converted once on first use, no network needed)."""
    data: Any
    """The data section (slimtune.data.DataConfig): path, format, eval_path, template, packing, ...;
    omitted: the defaults of DataConfig."""
    method: str = "lora"
    """lora | qlora | dora | adalora | ia3 | prefix_tuning | prompt_tuning | p_tuning | full."""
    peft: dict[str, Any] = field(default_factory=dict)
    """Fields of the method's config class, e.g. {r: 16, lora_alpha: 32, target_modules: all-linear}."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, schedule, precision and checkpoint cadence."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """4-bit loading options, used by method qlora."""
    output_dir: str = "runs/run"
    """Run folder: config.yaml, checkpoints/, adapter/ (model/ for full), metrics, plots, README.md."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError(f"'model' must name a model folder, a hub name or {DEFAULT_MODEL}")
        check_model_name(self.model)
        if not self.output_dir:
            raise ValueError("'output_dir' must be a folder path")
        if self.method not in METHODS:
            suggestion = closest_key(self.method, list(METHODS))
            hint = f"did you mean '{suggestion}'? " if suggestion else ""
            raise ValueError(f"method '{self.method}' is not a slimtune method; {hint}allowed: {', '.join(METHODS)}")
        check_peft_section(self.method, self.peft)
        from slimtune.data.loading import check_builtin_name

        for key in ("path", "eval_path"):
            if isinstance(value := getattr(self.data, key, None), str):
                check_builtin_name(value, f"data.{key}")
        if self.quant != QuantConfig() and not method_spec(self.method).quantized:
            raise ValueError(f"section 'quant' is used by method 'qlora' only; method is '{self.method}'")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"a run config must be a mapping of sections; got {type(raw).__name__}")
        check_keys(raw, _TOP_LEVEL, "")
        if raw.get("model") is None:
            raise ValueError(f"missing required key 'model' (a model folder, a hub name or {DEFAULT_MODEL})")
        return cls(
            model=coerce(raw["model"], str, "model"),
            data=from_mapping(_data_config_class(), raw.get("data"), "data"),
            method=coerce(raw.get("method", "lora"), str, "method"),
            peft=coerce(raw.get("peft") or {}, dict, "peft"),
            train=from_mapping(TrainConfig, raw.get("train"), "train"),
            quant=from_mapping(QuantConfig, raw.get("quant"), "quant"),
            output_dir=coerce(raw.get("output_dir", "runs/run"), str, "output_dir"),
        )

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_TOP_LEVEL = ("model", "method", "peft", "data", "train", "quant", "output_dir")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate the run YAML at `path`; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    raw = load_yaml(path) or {}  # UTF-8, no anchors or aliases, no duplicate keys (Note: strict YAML)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a run config must be a YAML mapping of sections (model, method, peft, data, "
                         f"train, output_dir), got a {type(raw).__name__}")
    parsed = parse_overrides(overrides or [])
    try:
        apply_overrides(raw, parsed)
        return RunConfig.from_dict(raw)
    except UnknownKeyError as err:
        given = next((key for key in parsed if f"{key}.".startswith(f"{err.dotted}.")), None)
        if given is None:
            raise ValueError(f"{path}: {err}") from None
        raise ValueError(unknown_override(given, err)) from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None


def unknown_override(given: str, err: UnknownKeyError) -> str:
    """The message for override `--given` whose part `err.key` is unknown, with the corrected override."""
    where = f"section '{err.section}'" if err.section else "the top level"
    if err.suggestion is None:
        return f"unknown override --{given}: {where} has no key '{err.key}'; allowed: {', '.join(sorted(err.allowed))}"
    fixed = (f"{err.section}." if err.section else "") + err.suggestion + given[len(err.dotted):]
    return f"unknown override --{given}: {where} has no key '{err.key}'; did you mean --{fixed}?"


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--train.lr", "1e-4", "--model=x"]` -> {"train.lr": 1e-4, "model": "x"} (values as YAML scalars)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected an override like --train.lr 1e-4, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"override --{key} needs a value, e.g. --{key} VALUE")
            value, i = args[i + 1], i + 1
        out[key.replace("-", "_")] = _yaml_scalar(value)
        i += 1
    return out


def _yaml_scalar(text: str) -> Any:
    try:
        return load_yaml_text(text, "override")
    except ValueError:  # not YAML (or an alias such as `*x`): the text itself
        return text


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set each dotted key of `overrides` in `raw` (creating sections as needed)."""
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = raw
        for i, name in enumerate(sections):
            if i == 0:
                check_keys([name], _TOP_LEVEL, "")
            if node.get(name) is None:
                node[name] = {}
            if not isinstance(node[name], dict):
                raise ValueError(f"override --{dotted}: '{name}' is not a section")
            node = node[name]
        node[key] = value
