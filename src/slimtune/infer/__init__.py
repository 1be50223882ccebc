"""slimtune.infer: loading a base model with adapters, batched generation, chat, merge, GGUF export, serving.

    loaded = load_for_inference("base-dir", adapters={"support": "run/adapter"})
    outs = generate(loaded, ["<prompt text>"], SamplingOptions(max_new_tokens=64), adapter="support")

Heavy or optional pieces (GGUF export, the HTTP server) live in their own modules and are imported
only when used.
"""

from slimtune.infer.generation import Generation, SamplingOptions, adapter_scope, generate
from slimtune.infer.loading import LoadedModel, load_for_inference, parse_adapter_args

__all__ = [
    "Generation",
    "LoadedModel",
    "SamplingOptions",
    "adapter_scope",
    "generate",
    "load_for_inference",
    "parse_adapter_args",
]
