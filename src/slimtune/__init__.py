"""slimtune: low-cost fine-tuning of large language models (LoRA, QLoRA and the PEFT family)."""

__version__ = "0.1.0"
