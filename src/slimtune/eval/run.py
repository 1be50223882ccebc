"""run_eval: what `slimtune eval` does, top to bottom.

load model (+ adapter) -> read held-out rows with slimtune.data -> for each model (base, fine-tuned):
perplexity on the training loss mask, greedy answers for rows ending with an assistant turn, BLEU /
ROUGE / exact match -> optionally a local judge grades the answers and compares fine-tuned vs base ->
metrics.json, samples.jsonl, chart.png and report.md in the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.eval.config import EvalConfig
from slimtune.eval.judge import Judge, summarize_pairs, summarize_scores
from slimtune.eval.perplexity import perplexity
from slimtune.eval.report import write_outputs
from slimtune.eval.text_metrics import score_corpus
from slimtune.infer.loading import LoadedModel

FINETUNED = "finetuned"
"""Name the adapter is loaded under; the base model runs with adapters disabled."""

MODEL_LABELS = {"base": "base model (adapter off)", FINETUNED: "tuned model (base + adapter)",
                "model": "model (no adapter given)"}
"""How progress lines name each scored model."""


@dataclass
class GenItem:
    """A row used for generation metrics: the prompt text, the question shown to the judge, the reference."""

    where: str
    prompt: str
    question: str
    reference: str


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    """What metrics.json holds."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Per-sample rows (samples.jsonl)."""
    output_dir: Path | None = None


def run_eval(cfg: EvalConfig, log: Any = print) -> EvalResult:
    from slimtune.data.templates import resolve_template
    from slimtune.infer.generation import adapter_scope
    from slimtune.infer.loading import load_for_inference

    loaded = load_for_inference(cfg.model, {FINETUNED: cfg.adapter} if cfg.adapter else None, cfg.quantization,
                                cfg.dtype, cfg.device)
    template = resolve_template(cfg.template, loaded.tokenizer)
    _check_template_tokens(loaded.tokenizer, template)
    samples = _load(cfg)
    examples = _examples(samples, loaded.tokenizer, template, cfg)
    items = _gen_items(samples, loaded.tokenizer, template) if cfg.generate else []
    names = ["base", FINETUNED] if cfg.adapter else ["model"]
    metrics: dict[str, Any] = {"config": vars(cfg).copy(), "rows": len(samples), "ppl_examples": len(examples),
                               "generation_samples": len(items), "models": {}}
    answers: dict[str, list[str]] = {}
    per_sample: dict[str, Any] = {}
    for name in names:
        adapter = FINETUNED if name == FINETUNED else None
        label = MODEL_LABELS.get(name, name)
        log(f"scoring the {label}: perplexity on {len(examples)} examples")
        with adapter_scope(loaded.model, adapter):
            ppl = perplexity(loaded.model, examples, loaded.tokenizer.pad_token_id, cfg.batch_size) if examples else None
        entry: dict[str, Any] = {"perplexity": ppl.perplexity, "loss": ppl.loss, "ppl_tokens": ppl.tokens} if ppl else {}
        if items:
            log(f"scoring the {label}: generating {len(items)} answers")
            answers[name] = _answer(loaded, items, cfg, adapter)
            scores = score_corpus(answers[name], [i.reference for i in items])
            entry.update(scores.summary())
            metrics["bleu_tokenize"] = scores.bleu_tokenize
            per_sample[name] = scores.samples
        metrics["models"][name] = entry
    judged = _judge(cfg, items, answers, names, metrics, log) if cfg.judge and items else {}
    rows = _sample_rows(items, names, answers, per_sample, judged)
    out = write_outputs(Path(cfg.output), metrics, rows, names)
    log(f"wrote {out}")
    return EvalResult(metrics, rows, Path(cfg.output))


def _load(cfg: EvalConfig) -> list[Any]:
    from slimtune.data.config import DataConfig
    from slimtune.data.loading import BUILTIN_PREFIX, builtin_dataset_files
    from slimtune.data.pipeline import load_samples

    path = cfg.data
    if path.startswith(BUILTIN_PREFIX):
        shipped_eval = builtin_dataset_files(path)[1]
        path = str(shipped_eval) if shipped_eval else str(builtin_dataset_files(path)[0])
    data_cfg = DataConfig(path=path, format=cfg.format, template=cfg.template, system_prompt=cfg.system_prompt)
    samples, _ = load_samples(path, data_cfg, max_rows=cfg.max_samples)
    if not samples:
        raise ValueError(f"--data {cfg.data}: no usable rows to evaluate")
    return samples


def _check_template_tokens(tokenizer: Any, template: Any) -> None:
    missing = [t for t in template.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"template {template.name!r} needs tokens {missing} that this tokenizer lacks; pass the "
                         "adapter folder of the run (it saves the tokenizer it trained with) or --template tokenizer")


def _examples(samples: list[Any], tokenizer: Any, template: Any, cfg: EvalConfig) -> list[dict[str, list[int]]]:
    from slimtune.data.tokenize import loss_tokens, tokenize_sample

    out = []
    for sample in samples:
        example, _ = tokenize_sample(sample, tokenizer, template, cfg.max_seq_len, cfg.all_tokens)
        if loss_tokens(example) > 0:
            out.append(example)
    return out


def _gen_items(samples: list[Any], tokenizer: Any, template: Any) -> list[GenItem]:
    from slimtune.data.templates import merge_inputs, render

    items = []
    for sample in samples:
        turns = sample.messages
        if sample.text is not None or len(turns) < 2 or turns[-1]["role"] != "assistant":
            continue
        prompt = render(tokenizer, template, turns[:-1], add_generation_prompt=True)
        question = merge_inputs([turns[-2]], keep_input=False)[0]["content"]
        items.append(GenItem(sample.where, prompt, question, turns[-1]["content"]))
    return items


def _answer(loaded: LoadedModel, items: list[GenItem], cfg: EvalConfig, adapter: str | None) -> list[str]:
    from slimtune.infer.generation import SamplingOptions, generate

    options = SamplingOptions(max_new_tokens=cfg.max_new_tokens)
    outs = generate(loaded, [i.prompt for i in items], options, adapter=adapter, chat=True, batch_size=cfg.batch_size)
    return [g.text.strip() for g in outs]


def _judge(cfg: EvalConfig, items: list[GenItem], answers: dict[str, list[str]], names: list[str],
           metrics: dict[str, Any], log: Any) -> dict[str, Any]:
    from slimtune.infer.loading import load_for_inference

    log(f"judging with {cfg.judge}")
    judge = Judge(load_for_inference(cfg.judge, None, "none", cfg.dtype, cfg.device), cfg.judge_max_new_tokens,
                  cfg.batch_size)
    questions = [i.question for i in items]
    judged: dict[str, Any] = {}
    for name in names:
        judged[name] = judge.grade(questions, answers[name])
        metrics["models"][name].update(summarize_scores(judged[name]))
    if FINETUNED in names:
        judged["pairwise"] = judge.compare(questions, answers[FINETUNED], answers["base"])
        metrics["pairwise"] = summarize_pairs(judged["pairwise"])
    metrics["judge"] = cfg.judge
    return judged


def _sample_rows(items: list[GenItem], names: list[str], answers: dict[str, list[str]],
                 per_sample: dict[str, Any], judged: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i, item in enumerate(items):
        row: dict[str, Any] = {"where": item.where, "question": item.question, "reference": item.reference,
                               "prompt": item.prompt}
        for name in names:
            scores = per_sample[name][i]
            row[name] = {"answer": answers[name][i], **vars(scores)}
            if name in judged:
                j = judged[name][i]
                row[name]["judge"] = {"prompt": j.prompt, "output": j.output, "score": j.parsed}
        if "pairwise" in judged:
            pair = judged["pairwise"][i]
            row["pairwise"] = {"outcome": pair["outcome"], **{
                order: {"prompt": pair[order].prompt, "output": pair[order].output, "verdict": pair[order].parsed}
                for order in ("first", "second")}}
        rows.append(row)
    return rows
