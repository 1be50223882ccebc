"""One training run from a RunConfig: data -> model -> Trainer.fit -> adapter, tokenizer, card, plot.

`run_training(cfg, resume)` is what `slimtune train` calls. The run folder ends up holding:
  config.yaml        the resolved config          checkpoints/step-N/   resumable state (newest 2)
  adapter/           PEFT adapter + tokenizer + base_quantization.json (model/ instead, for method full)
  metrics.jsonl      one row per logged step      tensorboard/          the same, for TensorBoard (report_to)
  .trackers.json     W&B / MLflow / Trackio run ids, so a resumed run continues them (train/trackers.py)
  loss.png           loss and lr by step          README.md             model card
  .slimtune-run.json marks the folder as a run folder slimtune may rewrite (train/run_folder.py)
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from safetensors import SafetensorError
from torch import nn

from slimtune.adapter_base import BaseQuantization, write_base_quantization
from slimtune.kernels.llama_fused import fast_modules
from slimtune.models import refuse_remote_tokenizer, resolve_model
from slimtune.peft_model import adapter_errors, count_parameters
from slimtune.strict_yaml import load_yaml
from slimtune.train.card import write_model_card
from slimtune.train.checkpoint import latest_checkpoint, write_failure
from slimtune.train.device import autocast_dtype, resolve_device, resolve_precision, weights_dtype
from slimtune.train.distributed import DistributedTrainer, is_distributed, is_main, save_on_main
from slimtune.train.distributed import setup as dist_setup
from slimtune.train.logs import PLOT_FILE, plot_metrics
from slimtune.train.loop import Trainer
from slimtune.train.methods import build_peft_config, load_base_model, method_spec, prepare_model
from slimtune.train.rng import seed_everything
from slimtune.train.run_config import RunConfig
from slimtune.train.run_folder import check_run_folder, claim_run_folder
from slimtune.train.sampler import BatchPlan
from slimtune.train.state import TrainState
from slimtune.train.trackers import require_installed


@dataclass
class RunResult:
    output_dir: Path
    """The run folder."""
    artifact_dir: Path
    """The final adapter (or full model) with its tokenizer."""
    state: TrainState
    """Final step, metrics history, best eval loss."""
    model: nn.Module
    """The trained model (PEFT-wrapped unless method full), still in memory."""
    tokenizer: Any
    """The tokenizer as prepared for the chat template."""
    data: Any
    """slimtune.data.Datasets: the tokenized train/eval examples, stats and chat template."""
    collate: Any
    """The batch collator used for training and evaluation."""


def run_training(cfg: RunConfig, resume: bool = False, progress: bool = True,
                 console: Console | None = None) -> RunResult:
    console = console or Console(stderr=True)
    if not is_main():  # under torchrun only rank 0 speaks and writes
        console = Console(stderr=True, quiet=True)
    out = Path(cfg.output_dir)
    check_output_dir(out, resume)
    require_installed(cfg.train.report_to)  # before minutes of model loading
    device = dist_setup(cfg.train.device) if is_distributed() else resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    from slimtune.data import SFTCollator, build_datasets

    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tokenizer, cfg.train.max_seq_len, cfg.train.seed)
    plan = batch_plan(cfg, data.train)
    total_steps = cfg.train.total_steps(plan.steps_per_epoch(cfg.train.grad_accum))
    model = build_model(cfg, device, len(tokenizer) if data.added_tokens else None, total_steps)
    describe_run(console, cfg, data, model, device, total_steps)
    if resume:
        report_config_changes(out / "config.yaml", cfg, console)
    if is_main():
        claim_run_folder(out, "train")
        cfg.save(out / "config.yaml")
    out.mkdir(parents=True, exist_ok=True)

    mask_dtype = autocast_dtype(cfg.train.precision, device) or torch.float32
    collate = SFTCollator(tokenizer.pad_token_id, packed_attention=cfg.data.packed_attention, mask_dtype=mask_dtype)
    is_peft = method_spec(cfg.method).config_class is not None
    extra = {"strategy": cfg.train.distributed} if is_distributed() else {}
    trainer = (DistributedTrainer if is_distributed() else Trainer)(
        model, cfg.train, data.train, data.eval, collate, out, plan=plan, save_adapter=is_peft,
        base_record=base_record(cfg), progress=progress and is_main(), console=console, run_config=cfg.to_dict(),
        **extra)
    state = trainer.fit(resume=resume)

    artifact = save_on_main(model, lambda: save_outputs(out / ("adapter" if is_peft else "model"), cfg, model,
                                                       tokenizer, data, state, console))
    return RunResult(out, artifact, state, model, tokenizer, data, collate)


def save_outputs(artifact: Path, cfg: RunConfig, model: nn.Module, tokenizer: Any, data: Any, state: TrainState,
                 console: Console) -> Path:
    """The final adapter (or model) with its tokenizer + generation config, the plot and the model card."""
    from slimtune.data import save_tokenizer_for_run

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = method_spec(cfg.method)
    record = base_record(cfg)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        save_tokenizer_for_run(tokenizer, data.template, tmp, generation_config=getattr(base, "generation_config",
                                                                                          None))
        if spec.config_class is not None:  # an adapter folder (method full saves a whole model)
            write_base_quantization(tmp, record)

    save_atomically(artifact, write)
    plot_metrics(state.history, artifact.parent / PLOT_FILE, console)
    # the card's code loads the base with plain transformers, which knows folders, not slimtune: names
    card_cfg = replace(cfg, model=resolve_model(cfg.model))
    write_model_card(artifact.parent / "README.md", card_cfg, state, data.stats, artifact.name)
    console.print(f"[green]done:[/green] {state.step} steps; {escape(str(artifact.parent))} holds "
                  f"{escape(', '.join(_run_folder_entries(artifact.parent)))}", highlight=False, soft_wrap=True)
    return artifact


def base_record(cfg: RunConfig) -> BaseQuantization:
    """How the run loads its base, recorded in every adapter folder it writes (final and checkpoints), so an
    adapter loads on the base it was trained on wherever it is copied."""
    quantized = method_spec(cfg.method).quantized
    return BaseQuantization(cfg.quant.type if quantized else "none", quantized and cfg.quant.double_quant)


def _run_folder_entries(run: Path) -> list[str]:
    """What the run folder holds, as listed on disk (folders end in '/'); hidden bookkeeping files left out.

    check_output_dir admits only a new folder or a slimtune run folder, so all it holds is run output.
    """
    entries = (p for p in run.iterdir() if not p.name.startswith("."))
    return [f"{p.name}/" if p.is_dir() else p.name for p in sorted(entries, key=lambda p: p.name.lower())]


def check_output_dir(out: Path, resume: bool) -> None:
    """Refuse a folder slimtune did not create (Note: run folder ownership), and checkpoints without --resume."""
    check_run_folder(out, "output_dir")
    last = latest_checkpoint(out / "checkpoints")
    if last is not None and not resume:
        raise ValueError(f"output_dir {out} already holds checkpoints ({last.name}): pass --resume to continue "
                         "that run, or choose another output_dir")
    if resume and last is None:
        raise ValueError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")


def load_tokenizer(model: str) -> Any:
    """The tokenizer of a config's `model` (a folder, a hub name or a slimtune: name)."""
    from transformers import AutoTokenizer

    path = resolve_model(model)
    refuse_remote_tokenizer(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"model: cannot load a tokenizer from {path!r} ({_first_line(err)})") from None


def build_model(cfg: RunConfig, device: torch.device, vocab_size: int | None, total_steps: int) -> nn.Module:
    """Load the base model, grow its vocabulary if the template added tokens, and prepare `cfg.method`."""
    peft_config = None if cfg.method == "full" else build_peft_config(cfg.method, cfg.peft, total_steps)
    dtype = torch.float32 if cfg.method == "full" else weights_dtype(cfg.train.precision, device)
    path = resolve_model(cfg.model)
    try:
        model = load_base_model(path, cfg.method, dtype, cfg.quant, device)
    except (OSError, SafetensorError) as err:  # SafetensorError: a truncated download, for one
        raise ValueError(f"model: cannot load {cfg.model!r} ({_first_line(err)})") from None
    if vocab_size is not None and vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    model.to(device)
    with adapter_errors("peft"):  # an r or num_virtual_tokens too large to allocate: one line, not a traceback
        return prepare_model(model, cfg.method, peft_config, cfg.train.gradient_checkpointing)


def batch_plan(cfg: RunConfig, rows: list[dict[str, list[int]]]) -> BatchPlan:
    lengths = tuple(len(r["input_ids"]) for r in rows) if cfg.data.group_by_length else None
    return BatchPlan(len(rows), cfg.train.batch_size, cfg.train.seed, shuffle=cfg.data.shuffle, lengths=lengths)


def describe_run(console: Console, cfg: RunConfig, data: Any, model: nn.Module, device: torch.device,
                 total_steps: int) -> None:
    stats = data.stats
    trainable, total = count_parameters(model)  # as peft counts: a packed 4-bit byte holds two weights
    precision = resolve_precision(cfg.train.precision, device)
    console.print(
        f"[bold]{cfg.method}[/bold] on {cfg.model}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / max(1, total):.3f}%)\n"
        f"data: {stats.train_examples} train / {stats.eval_examples} eval examples ({stats.format}, "
        f"template {stats.template}); {total_steps} steps of {cfg.train.batch_size} x {cfg.train.grad_accum} "
        f"on {device} in {precision}"
    )
    if method_spec(cfg.method).quantized and device.type == "cpu":
        console.print("[yellow]warning: qlora on CPU is slower than lora: every matmul dequantizes the 4-bit "
                      "weights first (no fused 4-bit kernel on CPU), and the memory it saves rarely matters for a "
                      "model small enough to train on CPU; consider method: lora[/yellow]", highlight=False,
                      soft_wrap=True)
    fused = fast_modules(model)
    if fused:
        console.print(f"fast path: fused {', '.join(sorted(set(fused.values())))} in {len(fused)} modules "
                      "(self-checked against transformers' own forward)")
    if data.added_tokens and cfg.method != "full" and not cfg.peft.get("modules_to_save"):
        console.print(f"[yellow]the template added tokens {data.added_tokens} to the tokenizer; their new "
                      "embeddings stay untrained unless peft.modules_to_save includes the embedding and lm_head "
                      "(e.g. [embed_tokens, lm_head]), or pick a template the tokenizer already knows[/yellow]")


def report_config_changes(saved: Path, cfg: RunConfig, console: Console) -> None:
    if not saved.is_file():
        return
    changes = _diff(load_yaml(saved) or {}, cfg.to_dict())
    if changes:
        console.print(f"[yellow]resuming with a changed config: {', '.join(changes)}[/yellow]")


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def save_atomically(target: Path, write: Any) -> None:
    """Call write(tmp_folder), then swap tmp_folder into `target` (never a half-written target)."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except Exception as err:  # noqa: BLE001 - narrowed just below
        if not isinstance(err, OSError | RuntimeError) and type(err) is not Exception:
            raise
        failure = write_failure(_as_os_error(err), tmp, str(target), latest_checkpoint(target.parent / "checkpoints"))
        shutil.rmtree(tmp, ignore_errors=True)
        raise failure from err
    old = target.with_name(f".old-{target.name}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _as_os_error(err: Exception) -> Exception:
    """The tokenizers library's writer raises a bare Exception ("No space left on device (os error 28)"):
    as an OSError with that errno, so write_failure and the CLI treat it as the I/O error it is."""
    if type(err) is not Exception:
        return err
    found = re.search(r"os error (\d+)", str(err))
    return OSError(int(found.group(1)) if found else errno.EIO, _first_line(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
