"""Prompt templates: the tokenizer's own chat template, or a built-in one written as a Jinja chat
template, so that training, the saved tokenizer and inference all render through one path,
`tokenizer.apply_chat_template`.

Built-ins (every assistant turn ends with the end-of-turn token, which is trained):
  alpaca   Stanford Alpaca: preamble, "### Instruction:\\n...\\n\\n[### Input:\\n...\\n\\n]### Response:\\n"
           then the answer + eos; later rounds are separated by a blank line.
  chatml   "<|im_start|>{role}\\n{content}<|im_end|>\\n"; end of turn <|im_end|>.
  llama2   "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>" per round.
  chatglm  ChatGLM2: "[Round 1]\\n\\n问：{user}\\n\\n答：{answer}" + eos, rounds separated by "\\n\\n".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimtune.data.formats import Turn

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

_ALPACA = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + '\\n\\n' }}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}"
    "{%- if messages[0]['input'] is defined and messages[0]['input'] -%}"
    "{{ '" + ALPACA_PREAMBLE_INPUT + "\\n\\n' }}{%- else -%}{{ '" + ALPACA_PREAMBLE + "\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if not loop.first -%}{{ '\\n\\n' }}{%- endif -%}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- if message['input'] is defined and message['input'] -%}{{ '### Input:\\n' + message['input'] + '\\n\\n' }}{%- endif -%}"
    "{{ '### Response:\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)

_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{ (bos_token or '') + '[INST] ' + content | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)

_CHATGLM = (
    "{%- set ns = namespace(round=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{%- set ns.round = ns.round + 1 -%}"
    "{%- if ns.round > 1 -%}{{ '\\n\\n' }}{%- endif -%}"
    "{{ '[Round ' + ns.round | string + ']\\n\\n问：' + message['content'] + '\\n\\n答：' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)

_BUILTIN_JINJA = {"alpaca": _ALPACA, "chatml": _CHATML, "llama2": _LLAMA2, "chatglm": _CHATGLM}
_BOS_PREFIX = "{{ bos_token or '' }}"


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: its Jinja source and the token that ends an assistant turn."""

    name: str
    """Built-in name, "tokenizer" for the tokenizer's own chat template, or the path of a .jinja file."""
    jinja: str
    """Jinja chat template, rendered with `tokenizer.apply_chat_template(chat_template=...)`."""
    eot_token: str
    """Token closing every assistant turn (trained, and a stop token for generation)."""
    special_tokens: tuple[str, ...] = ()
    """Tokens the template needs as single special tokens in the vocabulary."""

    @property
    def keeps_input(self) -> bool:
        """Only alpaca prints an alpaca row's `input` separately; others merge it into the content."""
        return self.name == "alpaca"


def resolve_template(name: str, tokenizer) -> ChatTemplate:
    """`auto` -> the tokenizer's chat template if set, else alpaca; `tokenizer`; a built-in; or the
    path of a .jinja file holding a chat template."""
    if name.endswith(".jinja"):
        return _file_template(name, tokenizer)
    own = _own_template(tokenizer)
    if name == "tokenizer" or (name == "auto" and own):
        if not own:
            raise ValueError("data.template='tokenizer' but the tokenizer has no chat_template; use auto or one of "
                             f"{', '.join(_BUILTIN_JINJA)}")
        return ChatTemplate("tokenizer", own, _detect_eot(tokenizer, own))
    name = "alpaca" if name == "auto" else name
    if name not in _BUILTIN_JINJA:
        raise ValueError(f"unknown template {name!r}; allowed: auto, tokenizer, {', '.join(_BUILTIN_JINJA)}")
    if name == "chatml":
        return ChatTemplate(name, _with_bos(_CHATML, tokenizer), "<|im_end|>", ("<|im_start|>", "<|im_end|>"))
    if tokenizer.eos_token is None:
        raise ValueError(f"template {name!r} ends each answer with eos, but the tokenizer has no eos_token")
    jinja = _BUILTIN_JINJA[name] if name == "llama2" else _with_bos(_BUILTIN_JINJA[name], tokenizer)
    return ChatTemplate(name, jinja, tokenizer.eos_token)


def _file_template(path: str, tokenizer) -> ChatTemplate:
    """A Jinja chat template read from `path`; it renders like a tokenizer's own (nothing prepended)."""
    file = Path(path).expanduser()
    try:
        jinja = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"data.template={path!r}: chat template file not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not jinja.strip():
        raise ValueError(f"{path}: the chat template file is empty")
    from jinja2 import TemplateError as JinjaError

    try:
        eot = _detect_eot(tokenizer, jinja)
    except JinjaError as exc:  # syntax errors, raise_exception(...) on a plain user/assistant chat
        raise ValueError(f"{path}: not a usable Jinja chat template ({type(exc).__name__}: {exc}); it must render "
                         "messages=[{role, content}, ...] (and add_generation_prompt)") from None
    return ChatTemplate(path, jinja, eot)


def merge_inputs(messages: list[Turn], keep_input: bool) -> list[dict[str, str]]:
    """Plain {role, content} turns for rendering; an alpaca `input` is folded into the content
    (after a blank line) unless the template prints it itself."""
    out = []
    for turn in messages:
        extra = turn.get("input", "")
        if keep_input and extra:
            out.append({"role": turn["role"], "content": turn["content"], "input": extra})
        else:
            content = f"{turn['content']}\n\n{extra}" if extra else turn["content"]
            out.append({"role": turn["role"], "content": content})
    return out


def render(tokenizer, template: ChatTemplate, messages: list[Turn], add_generation_prompt: bool = False) -> str:
    """The conversation as text, through `tokenizer.apply_chat_template`."""
    return tokenizer.apply_chat_template(
        merge_inputs(messages, template.keeps_input),
        chat_template=template.jinja,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def _own_template(tokenizer) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one renders chats
        own = own.get("default")
    return own or None


def _with_bos(jinja: str, tokenizer) -> str:
    """Prefix bos when the tokenizer itself would (Llama-style), so the model sees what it was
    pretrained with; the rendered text then carries it and tokenization adds no special tokens."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return jinja
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return _BOS_PREFIX + jinja if probe[:1] == [bos_id] else jinja


def _detect_eot(tokenizer, jinja: str) -> str:
    """The first special token the template writes after an assistant's content (e.g. <|im_end|>,
    <|eot_id|>, <end_of_turn>), else eos."""
    marker = "Zq7xMarker"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], chat_template=jinja, tokenize=False
    )
    tail = text[text.rfind(marker) + len(marker) :] if marker in text else ""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id)
    if tokenizer.eos_token is None:
        raise ValueError("cannot find the end-of-turn token of the tokenizer's chat template, and it has no eos_token")
    return tokenizer.eos_token
