"""Batched generation: left-padded prompts, one adapter (or none) per batch, per-row token limits.

Decoder-only models continue from the last position of each row, so a batch is padded on the left
(B, T) with attention_mask 0 on the pads; transformers derives position_ids from the mask, so a
padded row generates what it would alone. Each row may ask for its own `max_new_tokens`: the batch
runs to the largest, and `RowLimits` marks a row finished once it has its share (transformers then
pads it), so its tokens equal those of a single-row run.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimtune.data.control_tokens import ContentGuard, encode_literal
from slimtune.infer.loading import LoadedModel

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""torch.manual_seed's range."""


@dataclass
class SamplingOptions:
    """How to pick tokens; temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    """Most tokens generated after the prompt."""
    temperature: float = 0.0
    """Softmax temperature; 0 decodes greedily (deterministic)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (sampling only)."""
    seed: int | None = None
    """Seed for sampling (None: the global RNG as it is)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature!r} must be a number in [0, 100] (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed={self.seed!r} must be an integer in [{SEED_MIN}, {SEED_MAX}] (torch's seed range)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    """One row's result."""

    text: str
    """The generated text (special tokens removed)."""
    token_ids: list[int]
    """Generated token ids, the stop token included when one was hit."""
    finish_reason: str
    """"stop" (a stop token) or "length" (max_new_tokens reached)."""
    prompt_tokens: int = 0
    """Length of the prompt in tokens."""


@dataclass
class RowLimits:
    """A transformers StoppingCriteria: row b is done after `limits[b]` new tokens or when cancelled."""

    prompt_width: int
    """Width of the left-padded prompt batch (T)."""
    limits: list[int]
    """Per-row max_new_tokens."""
    cancelled: list[threading.Event] | None = None
    """Per-row flags set by a caller that stopped listening (e.g. a closed HTTP stream)."""
    _limits: torch.Tensor | None = field(default=None, repr=False)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self._limits is None or self._limits.device != input_ids.device:
            self._limits = torch.tensor(self.limits, device=input_ids.device)
        done = (input_ids.shape[1] - self.prompt_width) >= self._limits  # (B,)
        if self.cancelled is not None:
            flags = torch.tensor([c.is_set() for c in self.cancelled], device=input_ids.device)
            done = done | flags
        return done


@contextlib.contextmanager
def adapter_scope(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run with `adapter` active, or with every adapter disabled when None (the base model)."""
    if not hasattr(model, "peft_config"):
        if adapter is not None:
            raise ValueError(f"adapter {adapter!r} requested but the model has no adapters")
        yield
        return
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    if adapter not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter!r}; loaded: {sorted(model.peft_config)}")
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(previous)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text of a conversation, ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; chat needs one (train with slimtune, whose "
                         "adapter folder saves it, or use a chat model)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids of a conversation (see render_chat), with control tokens written inside the
    messages' content tokenized as plain text: a message cannot forge turns. Raises ControlTokenError
    when a template rewrites content so that such tokens cannot be located."""
    guard = ContentGuard(tokenizer, messages)
    text = render_chat(tokenizer, guard.messages)
    if not guard.found:
        return encode(tokenizer, [text], chat=True)[0]
    (text,), spans = guard.restore([text], render_chat(tokenizer, messages))
    return encode_literal(tokenizer, text, spans)[0]


def encode(tokenizer: Any, texts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids per text; rendered chats already hold their special tokens (none are added)."""
    return [list(tokenizer(t, add_special_tokens=not chat)["input_ids"]) for t in texts]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), rows aligned on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def generation_config(model: nn.Module, options: SamplingOptions, stop_ids: list[int], pad_id: int,
                      max_new_tokens: int) -> Any:
    """A GenerationConfig copied from the model's, with `options` applied."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.do_sample = not options.greedy
    config.temperature = options.temperature if not options.greedy else 1.0
    config.top_p = options.top_p if not options.greedy else 1.0
    config.top_k = None
    config.eos_token_id = list(stop_ids) or None
    config.pad_token_id = pad_id
    return config


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], options: SamplingOptions,
                 stop_ids: list[int], adapter: str | None = None, limits: Sequence[int] | None = None,
                 streamer: Any = None, cancelled: list[threading.Event] | None = None) -> list[Generation]:
    """Generate for token-id prompts in one left-padded batch."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limits = list(limits) if limits is not None else [options.max_new_tokens] * len(prompts)
    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
    config = generation_config(model, options, stop_ids, tokenizer.pad_token_id, max(limits))
    from transformers import StoppingCriteriaList

    criteria = StoppingCriteriaList([RowLimits(input_ids.shape[1], limits, cancelled)])
    if options.seed is not None:
        torch.manual_seed(options.seed)
    with adapter_scope(model, adapter):
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                             stopping_criteria=criteria, streamer=streamer)
    new = out[:, input_ids.shape[1]:].tolist()
    return [_finish(tokenizer, row, limit, stop_ids, len(p)) for row, limit, p in zip(new, limits, prompts)]


def _finish(tokenizer: Any, row: list[int], limit: int, stop_ids: list[int], prompt_len: int) -> Generation:
    tokens: list[int] = []
    reason = "length"
    for token in row[:limit]:
        tokens.append(token)
        if token in stop_ids:
            reason = "stop"
            break
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Generation(text, tokens, reason, prompt_len)


def generate(loaded: LoadedModel, prompts: Sequence[str], options: SamplingOptions, adapter: str | None = None,
             chat: bool = True, batch_size: int = 8) -> list[Generation]:
    """Generate for prompt texts (rendered chats when `chat`), `batch_size` rows at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    ids = encode(loaded.tokenizer, prompts, chat)
    out: list[Generation] = []
    for start in range(0, len(ids), batch_size):
        out += generate_ids(loaded.model, loaded.tokenizer, ids[start:start + batch_size], options,
                            loaded.stop_token_ids, adapter)
    return out
