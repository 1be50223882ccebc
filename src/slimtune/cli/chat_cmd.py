"""`slimtune chat`: terminal multi-turn chat with streaming output and adapter switching.

Its options are the fields of slimtune.infer.config.ChatConfig. Registered in main.py.
"""

from __future__ import annotations

from slimtune.cli.common import quiet_transformers
from slimtune.cli.options import config_command
from slimtune.infer.config import ChatConfig


def run_chat(cfg: ChatConfig) -> None:
    import sys

    from slimtune.infer.chat import ChatSession
    from slimtune.infer.loading import load_for_inference, parse_adapter_args

    quiet_transformers()
    loaded = load_for_inference(cfg.model, parse_adapter_args(cfg.adapter), cfg.quantization, cfg.dtype, cfg.device)
    ChatSession(loaded, cfg.sampling(), system=cfg.system, output=sys.stdout).run(sys.stdin)


chat_command = config_command(run_chat, ChatConfig, doc="""\
Chat with a model in the terminal; `/help` inside lists the commands (`/adapter off`, `/system`, ...).

Example: `slimtune chat --model base/ --adapter runs/a/adapter --system "You are a support agent."`
""")
