"""Adapter methods, one folder each; registry.py maps PeftType -> folder."""
