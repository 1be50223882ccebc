"""slimtune: low-cost fine-tuning of large language models (LoRA, QLoRA and the PEFT family).

The API is HF peft's: code written for peft runs with `peft` replaced by `slimtune`, and adapters
are saved in peft's file format. QLoRA needs no bitsandbytes: `load_model(path, quantization="nf4")`.
"""

from slimtune.config import PeftConfig, PeftType, TaskType
from slimtune.kernels.llama_fused import disable_fast_path, enable_fast_path
from slimtune.methods.adalora.config import AdaLoraConfig
from slimtune.methods.ia3.config import IA3Config
from slimtune.methods.lora.config import LoraConfig
from slimtune.methods.p_tuning.config import PromptEncoderConfig
from slimtune.methods.prefix_tuning.config import PrefixTuningConfig
from slimtune.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from slimtune.models import default_model_path
from slimtune.peft_model import PeftModel, get_peft_model
from slimtune.quant import (
    dequantize_4bit,
    load_model,
    prepare_model_for_kbit_training,
    quantize_4bit,
    save_quantized,
)

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "IA3Config",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "default_model_path",
    "dequantize_4bit",
    "disable_fast_path",
    "enable_fast_path",
    "get_peft_model",
    "load_model",
    "prepare_model_for_kbit_training",
    "quantize_4bit",
    "save_quantized",
]
