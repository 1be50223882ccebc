"""ChatSession: a multi-turn terminal chat driven by text streams, so tests can script it.

Each user line is appended to the conversation, rendered with the tokenizer's chat template and
answered with streaming output: transformers' TextIteratorStreamer is fed by `generate` running in a
worker thread while this thread writes the text pieces as they arrive. Lines starting with "/" are
commands (see HELP); the adapter can be switched off, on, or to another loaded adapter mid-chat.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

from slimtune.data.control_tokens import ControlTokenError
from slimtune.infer.generation import SamplingOptions, encode_chat, generate_ids
from slimtune.infer.loading import LoadedModel

HELP = """commands:
  /adapter            show the active adapter and the loaded ones
  /adapter off|on     run the base model alone / the last adapter again
  /adapter NAME       switch to another loaded adapter
  /system TEXT        set the system prompt (/system alone removes it)
  /set KEY VALUE      temperature, top_p or max_new_tokens
  /reset              forget the conversation
  /help               this text
  /quit               leave (also /exit, or end of input)"""

USER_PROMPT = "you> "
BOT_PROMPT = "bot> "
_SETTABLE: dict[str, Callable[[str], Any]] = {"temperature": float, "top_p": float, "max_new_tokens": int}


class ChatSession:
    """Holds the conversation, the sampling options and the active adapter of one chat."""

    def __init__(self, loaded: LoadedModel, options: SamplingOptions | None = None, system: str | None = None,
                 output: TextIO | None = None, adapter: str | None = "first") -> None:
        import sys

        self.loaded = loaded
        self.options = options or SamplingOptions()
        self.system = system
        self.out = output or sys.stdout
        names = list(loaded.adapters)
        self.adapter = (names[0] if names else None) if adapter == "first" else adapter
        if self.adapter is not None and self.adapter not in loaded.adapters:
            raise ValueError(f"adapter {self.adapter!r} is not loaded; loaded: {names or 'none'}")
        self._last_adapter = self.adapter or (names[0] if names else None)
        self.history: list[dict[str, str]] = []

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, lines: TextIO) -> None:
        """Read lines until /quit or end of input; each is a command or a user turn."""
        self._write(f"chatting with {self._who()}; /help for commands\n")
        while True:
            self._write(USER_PROMPT)
            line = lines.readline()
            if not line:
                self._write("\n")
                return
            if not self.handle(line.rstrip("\n")):
                return

    def handle(self, line: str) -> bool:
        """Act on one input line; False means the chat is over."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith("/"):
            self.reply(text)
            return True
        command, _, arg = text.partition(" ")
        arg = arg.strip()
        if command in ("/quit", "/exit"):
            return False
        actions: dict[str, Callable[[str], None]] = {"/adapter": self._cmd_adapter, "/system": self._cmd_system,
                                                     "/set": self._cmd_set, "/reset": self._cmd_reset,
                                                     "/help": lambda _: self._write(HELP + "\n")}
        if command not in actions:
            self._write(f"unknown command {command}; /help lists them\n")
            return True
        actions[command](arg)
        return True

    def reply(self, text: str) -> str:
        """Answer one user turn, streaming it to the output; returns the answer."""
        self.history.append({"role": "user", "content": text})
        try:
            answer = self._stream(self.messages())
        except ControlTokenError as err:  # this line cannot be encoded safely: say so, keep chatting
            self.history.pop()
            self._write(f"not sent: {err}\n")
            return ""
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def messages(self) -> list[dict[str, str]]:
        """The conversation as the model sees it (system prompt first)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    # ---- streaming ------------------------------------------------------------------------------
    def _stream(self, messages: list[dict[str, str]]) -> str:
        from transformers import TextIteratorStreamer

        tokenizer = self.loaded.tokenizer
        ids = [encode_chat(tokenizer, messages)]  # control tokens typed by the user stay text
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600.0)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                generate_ids(self.loaded.model, tokenizer, ids, self.options, self.loaded.stop_token_ids,
                             self.adapter, streamer=streamer)
            except BaseException as err:  # surfaced in the chat thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        self._write(BOT_PROMPT)
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            self._write(piece)
        thread.join()
        self._write("\n")
        if errors:
            raise errors[0]
        return "".join(pieces).strip()

    # ---- commands -------------------------------------------------------------------------------
    def _cmd_adapter(self, arg: str) -> None:
        names = list(self.loaded.adapters)
        if not arg:
            self._write(f"active: {self.adapter or 'off (base model)'}; loaded: {', '.join(names) or 'none'}\n")
        elif arg == "off":
            self.adapter = None
            self._write("adapter off: base model\n")
        elif arg == "on":
            if self._last_adapter is None:
                self._write("no adapter loaded (start with --adapter DIR)\n")
                return
            self.adapter = self._last_adapter
            self._write(f"adapter on: {self.adapter}\n")
        elif arg in self.loaded.adapters:
            self.adapter = self._last_adapter = arg
            self._write(f"adapter: {arg}\n")
        else:
            self._write(f"no adapter {arg!r}; loaded: {', '.join(names) or 'none'}\n")

    def _cmd_system(self, arg: str) -> None:
        self.system = arg or None
        self._write(f"system prompt: {arg}\n" if arg else "system prompt removed\n")

    def _cmd_set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        if key not in _SETTABLE:
            self._write(f"/set {key!r}: settable keys are {', '.join(_SETTABLE)}\n")
            return
        try:
            self.options = replace(self.options, **{key: _SETTABLE[key](value.strip())})
        except ValueError as err:
            self._write(f"/set {key}: {err}\n")
            return
        self._write(f"{key} = {getattr(self.options, key)}\n")

    def _cmd_reset(self, _: str) -> None:
        self.history.clear()
        self._write("conversation cleared\n")

    def _who(self) -> str:
        return f"{self.loaded.base_name} + {self.adapter}" if self.adapter else self.loaded.base_name

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
