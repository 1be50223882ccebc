"""slimtune: low-cost fine-tuning of large language models (LoRA, QLoRA and the PEFT family)."""

from slimtune.config import PeftConfig, PeftType, TaskType
from slimtune.methods.lora.config import LoraConfig
from slimtune.peft_model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "TaskType",
    "get_peft_model",
]
