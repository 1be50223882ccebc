"""ChatSession driven by scripted input on the tiny chat model: streamed replies equal greedy generation,
adapter switching, system prompt, reset, settings; and the `slimtune chat` command."""

from __future__ import annotations

import io

import pytest
from tiny_chat import cli_app
from typer.testing import CliRunner

from slimtune.infer.chat import BOT_PROMPT, ChatSession
from slimtune.infer.generation import SamplingOptions, generate, render_chat

GREEDY = SamplingOptions(max_new_tokens=8)


def _expected(loaded, messages, adapter):
    return generate(loaded, [render_chat(loaded.tokenizer, messages)], GREEDY, adapter=adapter)[0].text.strip()


def _replies(output: str) -> list[str]:
    """The streamed replies: what follows each bot prompt, up to the next user prompt."""
    return [seg.split("\nyou> ")[0].strip() for seg in output.split(BOT_PROMPT)[1:]]


def test_multi_turn_stream_with_adapter_switching(loaded):
    out = io.StringIO()
    session = ChatSession(loaded, GREEDY, system="You are helpful.", output=out)
    script = "Hello there!\n/adapter off\nHow are you?\n/adapter beta\nWhat does the word cat mean?\n/quit\nnever read\n"
    session.run(io.StringIO(script))
    replies = _replies(out.getvalue())
    assert len(replies) == 3
    sys_turn = [{"role": "system", "content": "You are helpful."}]
    turn1 = sys_turn + [{"role": "user", "content": "Hello there!"}]
    assert replies[0] == _expected(loaded, turn1, "alpha")  # the first adapter is active at start
    turn2 = turn1 + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "How are you?"}]
    assert replies[1] == _expected(loaded, turn2, None)
    turn3 = turn2 + [{"role": "assistant", "content": replies[1]},
                     {"role": "user", "content": "What does the word cat mean?"}]
    assert replies[2] == _expected(loaded, turn3, "beta")
    assert session.messages() == turn3 + [{"role": "assistant", "content": replies[2]}]
    assert "adapter off: base model" in out.getvalue() and "adapter: beta" in out.getvalue()


def test_adapters_differ_so_switching_is_observable(loaded):
    msgs = [{"role": "user", "content": "Hello there!"}]
    assert len({_expected(loaded, msgs, a) for a in (None, "alpha", "beta")}) == 3


def test_system_reset_set_and_unknown_commands(loaded):
    out = io.StringIO()
    session = ChatSession(loaded, GREEDY, output=out, adapter=None)
    session.handle("/system Be brief.")
    session.handle("hi")
    assert session.messages()[0] == {"role": "system", "content": "Be brief."} and len(session.history) == 2
    session.handle("/reset")
    assert session.history == []
    session.handle("/set temperature 0.5")
    session.handle("/set max_new_tokens 3")
    assert session.options.temperature == 0.5 and session.options.max_new_tokens == 3
    session.handle("/set top_p 2")
    assert session.options.top_p == 1.0 and "must be in (0, 1]" in out.getvalue()
    session.handle("/set color red")
    session.handle("/adapter nope")
    session.handle("/adapter on")
    assert session.adapter == "alpha"
    session.handle("/frobnicate")
    text = out.getvalue()
    assert "settable keys are temperature, top_p, max_new_tokens" in text
    assert "no adapter 'nope'; loaded: alpha, beta" in text and "unknown command /frobnicate" in text
    assert session.handle("/exit") is False


def test_sampling_reply_is_seeded_and_capped(loaded):
    options = SamplingOptions(max_new_tokens=3, temperature=1.0, top_p=0.9, seed=1)
    session = ChatSession(loaded, options, output=io.StringIO())
    answer = session.reply("Hello")
    prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": "Hello"}])
    [direct] = generate(loaded, [prompt], options, adapter="alpha")
    assert answer == direct.text.strip() and len(direct.token_ids) <= 3
    other = generate(loaded, [prompt], SamplingOptions(max_new_tokens=3, temperature=1.0, seed=2), adapter="alpha")
    assert other[0].token_ids != direct.token_ids


def test_unknown_start_adapter_is_an_error(loaded):
    with pytest.raises(ValueError, match="adapter 'gamma' is not loaded"):
        ChatSession(loaded, adapter="gamma")


def test_cli_chat_scripted(tiny_chat, loaded):
    result = CliRunner().invoke(cli_app(), [
        "chat", "--model", str(tiny_chat.base), "--adapter", str(tiny_chat.adapters["alpha"]),
        "--adapter", f"b={tiny_chat.adapters['beta']}", "--temperature", "0", "--max-new-tokens", "8",
        "--device", "cpu"], input="Hello there!\n/adapter b\nHello there!\n")
    assert result.exit_code == 0, result.output
    replies = _replies(result.output)
    msgs = [{"role": "user", "content": "Hello there!"}]
    assert replies[0] == _expected(loaded, msgs, "alpha")
    second = msgs + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "Hello there!"}]
    assert replies[1] == _expected(loaded, second, "beta")
