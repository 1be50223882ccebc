"""slimtune.infer.serve: an OpenAI-compatible HTTP server for one base model and several adapters.

Standard library only (http.server.ThreadingHTTPServer): serving needs no extra dependency. Requests
name an adapter (or the base model) in their `model` field; a scheduler thread batches waiting requests
of one adapter into a left-padded generation batch.

    server = Server(load_for_inference("base", {"support": "runs/a/adapter"}), ServeConfig(port=8000))
    server.serve_forever()
"""

from slimtune.infer.serve.config import ServeConfig
from slimtune.infer.serve.server import Server

__all__ = ["ServeConfig", "Server"]
