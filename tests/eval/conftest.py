"""Fixtures for evaluation tests: the tiny chat model with two adapters of tests/infer (tiny_chat.py)."""

from tiny_chat import loaded, tiny_chat  # noqa: F401  (fixtures; tests/conftest.py puts tests/infer on sys.path)
