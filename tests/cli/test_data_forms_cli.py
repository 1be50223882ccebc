"""Data as people have it, through the real CLI on the tiny model: TRL's prompt-completion rows, shown by
`slimtune data inspect` with only the completion trained, and trained one step by `slimtune train`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from slimtune.cli.main import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1"})


def write_config(root: Path, model_dir: Path, rows: list[dict], **data: object) -> Path:
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    raw = {
        "model": str(model_dir), "method": "lora", "peft": {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"},
        "data": {"path": str(train), "eval_split": 0, "shuffle": False, **data},
        "train": {"batch_size": 1, "max_seq_len": 160, "precision": "fp32", "device": "cpu",
                  "log_every": 1, "save_every": 100},
        "output_dir": str(root / "run"),
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def trained_spans(output: str) -> tuple[str, list[str]]:
    sample = output.split("no loss):\n", 1)[1]
    return sample, re.findall(r"⟦(.*?)⟧", sample, flags=re.S)


PROMPT_COMPLETION = [
    {"prompt": [{"role": "user", "content": "What does bread mean?"}, {"role": "assistant", "content": "a food"},
                {"role": "user", "content": "More precisely?"}],
     "completion": [{"role": "assistant", "content": "food made of flour, water and yeast"}]},
    {"prompt": [{"role": "user", "content": "What does honey mean?"}],
     "completion": [{"role": "assistant", "content": "a sweet fluid made by bees"}]},
]


def test_prompt_completion_rows_inspect_and_train(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, PROMPT_COMPLETION)
    result = invoke("data", "inspect", str(config))
    assert result.exit_code == 0, result.output
    assert "format prompt_completion" in result.output
    sample, trained = trained_spans(result.output)
    assert trained == ["food made of flour, water and yeast<|im_end|>\n"]  # the prompt's answer is context
    assert "a food<|im_end|>" in sample and "What does bread mean?" in sample
    result = invoke("train", str(config), "--train.max_steps", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in row and row["loss"] > 0 for row in metrics)


def test_standard_prompt_completion_strings(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"prompt": "What does river mean?", "completion": " a large natural stream of water"}]
    config = write_config(tmp_path, tiny_model_dir, rows, format="prompt_completion")
    result = invoke("data", "inspect", str(config))
    assert result.exit_code == 0, result.output
    sample, trained = trained_spans(result.output)
    # plain text, no chat template; the completion and the eos appended to it are trained
    assert trained == [" a large natural stream of water<|im_end|>"] and sample.startswith("What does river mean?⟦")


def test_mapped_columns_inspect_and_train(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"conversation": [{"speaker": "human", "text": "What does honey mean?"},
                              {"speaker": "bot", "text": "a sweet fluid made by bees"}]}]
    config = write_config(tmp_path, tiny_model_dir, rows, columns={"messages": "conversation", "role": "speaker",
                                                                   "content": "text"},
                          roles={"human": "user"})
    result = invoke("data", "inspect", str(config), "--data.roles.bot", "assistant")  # a mapping key as an override
    assert result.exit_code == 0, result.output
    assert "mapped: conversation -> messages, speaker -> role, text -> content, role 'human' -> 'user', " \
           "role 'bot' -> 'assistant'" in result.output and "format messages" in result.output
    sample, trained = trained_spans(result.output)
    assert trained == ["a sweet fluid made by bees<|im_end|>\n"] and "<|im_start|>user\nWhat does honey mean?" in sample
    result = invoke("train", str(config), "--train.max_steps", "1", "--no-progress", "--data.roles.bot", "assistant")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_missing_mapped_column_is_one_error_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"question": "What does honey mean?", "answer": "a sweet fluid"}, {"question": "q", "reply": "a"}]
    config = write_config(tmp_path, tiny_model_dir, rows, columns={"instruction": "question", "output": "answer"})
    result = invoke("data", "inspect", str(config))
    assert result.exit_code != 0
    assert f"{tmp_path / 'train.jsonl'} line 2, field 'answer': is missing; data.columns maps it to 'output'" \
           in result.output and "Traceback" not in result.output


TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + ':\n' + message['content'] + '<|im_end|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant:\n' }}{% endif %}")


def test_template_file_inspect_and_train(tmp_path: Path, tiny_model_dir: Path) -> None:
    template = tmp_path / "my_template.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")
    rows = [{"messages": [{"role": "user", "content": "What does honey mean?"},
                          {"role": "assistant", "content": "a sweet fluid made by bees"}]}]
    config = write_config(tmp_path, tiny_model_dir, rows, template=str(template))
    result = invoke("data", "inspect", str(config))
    assert result.exit_code == 0, result.output
    assert f"template {template}" in result.output
    sample, trained = trained_spans(result.output)
    assert sample.startswith("<|im_start|>user:\nWhat does honey mean?<|im_end|><|im_start|>assistant:\n⟦")
    assert trained == ["a sweet fluid made by bees<|im_end|>"]
    result = invoke("train", str(config), "--train.max_steps", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    saved = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.suffix in (".json", ".jinja")
             and TEMPLATE in (p.read_text(encoding="utf-8") if p.suffix == ".jinja"
                              else json.dumps(json.loads(p.read_text(encoding="utf-8"))))]
    assert saved, "the run's tokenizer keeps the template file's chat template"


def test_template_file_missing_is_one_error_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, PROMPT_COMPLETION, template="missing.jinja")
    result = invoke("data", "inspect", str(config))
    assert result.exit_code != 0 and "data.template='missing.jinja': chat template file not found" in result.output
