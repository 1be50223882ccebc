"""`slimtune chat`: terminal multi-turn chat with streaming output and adapter switching.

Registered in main.py with `app.command("chat")(chat_command)`.
"""

from __future__ import annotations

from typing import Annotated

import typer


def chat_command(
    model: Annotated[str, typer.Option("--model", help="Base model: a folder, a hub name or "
                                       "slimtune:smollm2-135m-instruct.", show_default=False)],
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="Adapter folder, or NAME=DIR; repeat to "
                                                      "load several (switch with `/adapter NAME`).")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 decodes greedily.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Reply length cap.")] = 512,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed.")] = None,
    quantization: Annotated[str, typer.Option("--quantization", help="auto | none | nf4 | fp4.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto | fp32 | bf16 | fp16.")] = "auto",
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1.")] = None,
) -> None:
    """Chat with a model in the terminal; `/help` inside lists the commands (`/adapter off`, `/system`, ...).

    Example: `slimtune chat --model base/ --adapter runs/a/adapter --system "You are a support agent."`
    """
    from slimtune.cli.main import _guarded, _quiet_transformers

    def body() -> None:
        import sys

        from slimtune.infer.chat import ChatSession
        from slimtune.infer.generation import SamplingOptions
        from slimtune.infer.loading import load_for_inference, parse_adapter_args

        options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        _quiet_transformers()
        loaded = load_for_inference(model, parse_adapter_args(adapter), quantization, dtype, device)
        ChatSession(loaded, options, system=system, output=sys.stdout).run(sys.stdin)

    _guarded(body)
