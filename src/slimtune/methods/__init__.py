"""Adapter methods, one folder each with the same shape; registry.py lists them by name."""
