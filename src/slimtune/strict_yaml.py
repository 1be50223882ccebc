"""Reading YAML that people write by hand: UTF-8 only, no anchors or aliases, no key given twice.

# Note: strict YAML
A run config is a short hand-written file, so three YAML features only ever hurt there:
- anchors and aliases (`&a` / `*a`): nested ones expand exponentially ("billion laughs": 650 bytes grow
  past 3 GB in memory, and any message that prints the value formats all of it);
- a key given twice in one mapping: YAML keeps the last one silently, so one of two `train:` sections,
  or the first `lr:`, is dropped without a word;
- bytes that are not UTF-8: Python's decoder names neither the file nor what to fix.
`load_yaml` refuses each with a ValueError naming the file, the line (or byte offset) and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class StrictYamlError(ValueError):
    """A YAML feature a hand-written config may not use; the message names line and column."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and duplicate mapping keys while composing the document."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise StrictYamlError(f"{_where(event)}: alias *{event.anchor} is not allowed; write the value out "
                                  "(anchors and aliases are refused in config files)")
        if getattr(event, "anchor", None) is not None:
            raise StrictYamlError(f"{_where(event)}: anchor &{event.anchor} is not allowed; write each value out "
                                  "(anchors and aliases are refused in config files)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not key_node:
                raise StrictYamlError(f"{_where(key_node)}: key {key!r} is given twice in one mapping (first at "
                                      f"line {first.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep)


def _where(item: Any) -> str:
    mark = item.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}"


def decode_utf8(data: bytes, path: Path) -> str:
    """`data` as text, or ValueError naming `path`, the byte offset and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {err.start} "
                         f"(line {line}) is {err.reason}; save the file as UTF-8") from None


def load_yaml(path: Path) -> Any:
    """The YAML document in `path` under the rules of Note: strict YAML; errors name the file."""
    return load_yaml_text(decode_utf8(path.read_bytes(), path), str(path))


def load_yaml_text(text: str, where: str) -> Any:
    """The YAML document `text` under the rules of Note: strict YAML; errors start with `where`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except StrictYamlError as err:
        raise StrictYamlError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ValueError(f"{where}: not valid YAML: nested too deeply") from None
