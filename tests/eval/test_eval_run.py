"""`slimtune eval` end to end on the tiny chat model: files, values, judge records, CLI errors."""

from __future__ import annotations

import json

import pytest
from tiny_chat import cli_app
from typer.testing import CliRunner

from slimtune.eval import EvalConfig, run_eval
from slimtune.eval.judge import Judge

ROWS = [
    {"instruction": "What does the word cat mean?", "output": "A small domesticated feline."},
    {"instruction": "床前明月光", "output": "疑是地上霜。"},
    {"messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hello there!"}]},
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaldata") / "eval.jsonl"
    # one format per file: alpaca rows as messages
    rows = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            if "instruction" in r else r for r in ROWS]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def _canned_judge(monkeypatch):
    """The tiny judge writes noise; replace its answers (not its prompts) with canned ones."""
    seen: list[list[str]] = []

    def ask(self, prompts):
        seen.append(list(prompts))
        if "[The Start of Assistant A's Answer]" in prompts[0]:  # pairwise, 2 orders x 3 samples
            return ["[[A]]", "[[B]]", "no idea", "[[B]]", "[[B]]", "still no idea"]
        return ["Good. Rating: [[8]]", "Rating: 3", "I refuse to rate."]

    monkeypatch.setattr(Judge, "ask", ask)
    return seen


def test_run_eval_writes_metrics_report_chart(tiny_chat, data_file, tmp_path, monkeypatch, loaded):
    seen = _canned_judge(monkeypatch)
    out = tmp_path / "out"
    result = run_eval(EvalConfig(model=str(tiny_chat.base), adapter=str(tiny_chat.adapters["alpha"]),
                                 data=str(data_file), output=str(out), max_new_tokens=6, judge=str(tiny_chat.base),
                                 device="cpu"), log=lambda _: None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "finetuned"}
    assert metrics["rows"] == 3 and metrics["generation_samples"] == 3 and metrics["bleu_tokenize"] == "zh"
    # the adapter changes perplexity; base perplexity is the adapter-disabled model's
    base, tuned = metrics["models"]["base"], metrics["models"]["finetuned"]
    assert base["perplexity"] != pytest.approx(tuned["perplexity"])
    assert base["ppl_tokens"] == tuned["ppl_tokens"] > 0
    # judge: scores 8, 3, unparsed for each model; pairwise: win, loss (B then B), unparsed
    assert base["judge_score"] == pytest.approx(5.5) and base["judge_unparsed"] == 1
    assert metrics["pairwise"] == {"win": 1, "loss": 0, "tie": 1, "unparsed": 1, "win_rate": 0.75}
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["A small domesticated feline.", "疑是地上霜。", "Hello there!"]
    assert rows[0]["finetuned"]["judge"]["output"] == "Good. Rating: [[8]]"
    assert rows[2]["finetuned"]["judge"]["score"] is None
    assert rows[0]["pairwise"]["first"]["prompt"].count("A small domesticated feline.") == 0  # answers, not refs
    assert rows[0]["pairwise"]["first"]["verdict"] == "A" and rows[0]["pairwise"]["outcome"] == "win"
    assert "[Question]\nWhat does the word cat mean?" in seen[0][0]
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| perplexity |" in report and "![base vs fine-tuned](chart.png)" in report
    assert "| 2 | 床前明月光 | 疑是地上霜。 |" in report
    assert result.metrics == metrics | {"config": result.metrics["config"]}
    # generation metrics equal greedy answers scored directly
    from slimtune.infer.generation import SamplingOptions, generate

    answer = generate(loaded, [rows[1]["prompt"]], SamplingOptions(max_new_tokens=6), adapter="alpha")[0].text
    assert rows[1]["finetuned"]["answer"] == answer.strip()


def test_ppl_all_tokens_counts_more_tokens(tiny_chat, data_file, tmp_path):
    common = dict(model=str(tiny_chat.base), data=str(data_file), generate=False, device="cpu")
    masked = run_eval(EvalConfig(output=str(tmp_path / "a"), **common), log=lambda _: None).metrics
    every = run_eval(EvalConfig(output=str(tmp_path / "b"), all_tokens=True, **common), log=lambda _: None).metrics
    assert set(masked["models"]) == {"model"}
    assert every["models"]["model"]["ppl_tokens"] > masked["models"]["model"]["ppl_tokens"]
    assert "bleu" not in masked["models"]["model"]


def test_cli_eval_and_user_errors(tiny_chat, data_file, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    ok = runner.invoke(cli_app(), ["eval", "--model", str(tiny_chat.base), "--adapter", str(tiny_chat.adapters["beta"]),
                                   "--data", str(data_file), "--output", str(out), "--max-new-tokens", "4",
                                   "--max-samples", "2", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "metrics.json").read_text())["rows"] == 2
    bad = runner.invoke(cli_app(), ["eval", "--model", str(tiny_chat.base), "--adapter", str(tmp_path),
                                    "--data", str(data_file), "--output", str(out)])
    assert bad.exit_code == 2 and "holds no adapter_config.json" in bad.output
    missing = runner.invoke(cli_app(), ["eval", "--model", str(tiny_chat.base), "--data", str(tmp_path / "no.jsonl"),
                                        "--output", str(out)])
    assert missing.exit_code == 2 and "not found" in missing.output
    unknown = runner.invoke(cli_app(), ["eval", "--model", str(tiny_chat.base), "--judge", "slimtune:judge",
                                        "--data", str(data_file), "--output", str(out)])
    assert unknown.exit_code == 2
    assert "--judge='slimtune:judge': no shipped model 'judge'" in " ".join(unknown.output.split())
