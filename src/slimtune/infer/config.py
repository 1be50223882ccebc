"""Settings of `slimtune chat`, `merge`, `export` and the models `serve` loads. Defaults live here only.

Each dataclass is one command's options (the CLI generates them from these fields and docstrings);
`LoadConfig` holds what every command that loads a model with adapters shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slimtune.models import check_model_name

if TYPE_CHECKING:
    from slimtune.infer.generation import SamplingOptions

__all__ = ["ChatConfig", "ExportConfig", "LoadConfig", "MergeConfig", "ServeModels"]


@dataclass(kw_only=True)
class LoadConfig:
    """Which base model to load, and how."""

    model: str
    """Base model: a folder in Hugging Face format, a hub name or slimtune:smollm2-135m-instruct."""
    quantization: str = "auto"
    """auto (4-bit when the adapter was trained on a 4-bit base: its base_quantization.json, or the
    config.yaml of its QLoRA run folder, says so) | none | nf4 | fp4."""
    dtype: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 | fp16."""
    device: str | None = None
    """torch device (cpu, cuda, cuda:1); None picks cuda when available, else cpu."""

    def __post_init__(self) -> None:
        check_model_name(self.model, "--model")


@dataclass(kw_only=True)
class ChatConfig(LoadConfig):
    """`slimtune chat`: a terminal conversation, sampled (not greedy) by default."""

    adapter: list[str] | None = None
    """Adapter folder, or NAME=DIR; repeat to load several (switch with `/adapter NAME`)."""
    system: str | None = None
    """System prompt."""
    temperature: float = 0.7
    """Softmax temperature; 0 decodes greedily."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    max_new_tokens: int = 512
    """Reply length cap in tokens."""
    seed: int | None = None
    """Sampling seed (None: not reproducible)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sampling()  # the sampling fields' own checks, before any model is loaded

    def sampling(self) -> SamplingOptions:
        from slimtune.infer.generation import SamplingOptions

        return SamplingOptions(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                               top_p=self.top_p, seed=self.seed)


@dataclass(kw_only=True)
class MergeConfig(LoadConfig):
    """`slimtune merge`: fold an adapter into its base; a 4-bit base is dequantized, never re-quantized."""

    adapter: str
    """Adapter folder."""
    output: str
    """New folder for the merged model."""
    max_logit_diff: float | None = None
    """Fail when merged and unmerged logits differ by more than this (None: max(floor, fraction of the
    largest logit) for the dtype: fp32 1e-3/1e-4, fp16 0.1/1e-2, bf16 0.5/5e-2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_logit_diff is not None and not self.max_logit_diff >= 0:
            raise ValueError(f"--max-logit-diff {self.max_logit_diff} must be a number >= 0")


@dataclass(kw_only=True)
class ServeModels(LoadConfig):
    """The models `slimtune serve` answers for: one base and its adapters."""

    adapter: list[str] | None = None
    """NAME=DIR (or DIR); repeat for several. Requests choose one with `model: NAME`."""
    model_name: str | None = None
    """Name of the base model in requests (None: the folder's name)."""


@dataclass(kw_only=True)
class ExportConfig:
    """`slimtune export`: a merged model to other formats (GGUF for llama.cpp)."""

    model: str
    """Merged model folder (from `slimtune merge`), or slimtune:smollm2-135m-instruct."""
    output: str
    """A .gguf file, or a folder receiving NAME-OUTTYPE.gguf per outtype."""
    gguf: bool = False
    """Write GGUF (the only export format for now)."""
    outtype: list[str] = field(default_factory=lambda: ["f16"])
    """f16 | q8_0 | f32; repeat for several files."""
    pre_tokenizer: str | None = None
    """llama.cpp name of the BPE pre-tokenizer when slimtune cannot identify it."""

    def __post_init__(self) -> None:
        check_model_name(self.model, "--model")
        if not self.gguf:
            raise ValueError("choose an export format: --gguf (the only one for now)")
        if len(set(self.outtype)) != len(self.outtype):
            raise ValueError(f"--outtype repeats a value: {self.outtype}")
