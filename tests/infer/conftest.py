"""Fixtures for inference tests: a tiny chat model with two adapters, built once per session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_chat import TinyChat, build_tiny_chat  # noqa: E402


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> TinyChat:
    return build_tiny_chat(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="session")
def loaded(tiny_chat):
    from slimtune.infer import load_for_inference

    return load_for_inference(tiny_chat.base, adapters=tiny_chat.adapters, device="cpu")
