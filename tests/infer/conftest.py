"""Fixtures for inference tests: a tiny chat model with two adapters (tiny_chat.py), built once per session."""

from tiny_chat import loaded, tiny_chat  # noqa: F401  (fixtures; tests/conftest.py puts tests/infer on sys.path)
