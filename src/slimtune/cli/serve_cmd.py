"""`slimtune serve`: an OpenAI-compatible HTTP server, one base model and several adapters.

Registered in main.py with `app.command("serve")(serve_command)`.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

API_KEY_ENV = "SLIMTUNE_API_KEY"


def serve_command(
    model: Annotated[str, typer.Option("--model", help="Base model: a folder, a hub name or "
                                       "slimtune:smollm2-135m-instruct.", show_default=False)],
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="NAME=DIR (or DIR); repeat for several. "
                                                      "Requests choose one with `model: NAME`.")] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Name of the base model in requests "
                                                   "(default: the folder's name).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (localhost by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar=API_KEY_ENV, help="Require `Authorization: "
                                                f"Bearer KEY` (or set {API_KEY_ENV}).")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Requests per batch.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Waiting requests before 429.")] = 64,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0.0, help="Wait for more requests of "
                                                 "the same adapter before running a batch.")] = 10.0,
    max_body_kb: Annotated[int, typer.Option("--max-body-kb", min=1, help="Largest request body (413 "
                                             "beyond).")] = 1000,
    quantization: Annotated[str, typer.Option("--quantization", help="auto | none | nf4 | fp4.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto | fp32 | bf16 | fp16.")] = "auto",
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1.")] = None,
) -> None:
    """Serve the model over HTTP with the OpenAI API (/v1/models, /v1/chat/completions, /v1/completions).

    Example: `slimtune serve --model base/ --adapter support=runs/a/adapter --port 8000`, then
    `curl localhost:8000/v1/chat/completions -d '{"model": "support", "messages": [...]}'`
    """
    from slimtune.cli.main import _guarded, _quiet_transformers, console

    def body() -> None:
        from slimtune.infer.loading import load_for_inference, parse_adapter_args
        from slimtune.infer.serve import ServeConfig, Server

        config = ServeConfig(host=host, port=port, api_key=api_key or os.environ.get(API_KEY_ENV) or None,
                             max_batch_size=max_batch_size, max_queue=max_queue, batch_wait_ms=batch_wait_ms,
                             max_body_bytes=max_body_kb * 1000)
        adapters = parse_adapter_args(adapter)
        _quiet_transformers()
        loaded = load_for_inference(model, adapters, quantization, dtype, device, base_name=model_name)
        server = Server(loaded, config)
        console.print(f"serving {', '.join(server.model_names())} at {server.url}/v1 "
                      f"({'API key required' if config.api_key else 'no API key'}); Ctrl-C stops",
                      highlight=False)
        server.serve_forever()

    _guarded(body)
