"""`slimtune serve`: an OpenAI-compatible HTTP server, one base model and several adapters.

Its options are the fields of slimtune.infer.config.ServeModels (what to load) and
slimtune.infer.serve.ServeConfig (where to listen, the limits). Registered in main.py.
"""

from __future__ import annotations

from slimtune.cli.common import console, quiet_transformers
from slimtune.cli.options import config_command
from slimtune.infer.config import ServeModels
from slimtune.infer.serve.config import ServeConfig

API_KEY_ENV = "SLIMTUNE_API_KEY"


def run_serve(models: ServeModels, config: ServeConfig) -> None:
    from slimtune.infer.loading import load_for_inference, parse_adapter_args
    from slimtune.infer.serve import Server

    adapters = parse_adapter_args(models.adapter)
    quiet_transformers()
    loaded = load_for_inference(models.model, adapters, models.quantization, models.dtype, models.device,
                                base_name=models.model_name)
    server = Server(loaded, config)
    console.print(f"serving {', '.join(server.model_names())} at {server.url}/v1 "
                  f"({'API key required' if config.api_key else 'no API key'}); Ctrl-C stops", highlight=False)
    server.serve_forever()


serve_command = config_command(run_serve, ServeModels, ServeConfig, option_args={"api_key": {"envvar": API_KEY_ENV}},
                               doc=f"""\
Serve the model over HTTP with the OpenAI API (/v1/models, /v1/chat/completions, /v1/completions).

The API key may also come from the {API_KEY_ENV} environment variable.

Example: `slimtune serve --model base/ --adapter support=runs/a/adapter --port 8000`, then
`curl localhost:8000/v1/chat/completions -d '{{"model": "support", "messages": [...]}}'`
""")
