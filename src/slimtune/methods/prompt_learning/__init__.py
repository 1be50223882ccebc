"""What prompt tuning, prefix tuning and P-tuning share: the config base, the stored (inference) prompt,
and the two ways a prompt reaches the model: virtual input embeddings, or a prefix key/value cache."""

from slimtune.methods.prompt_learning import prefix_cache, virtual_tokens
from slimtune.methods.prompt_learning.config import PromptLearningConfig, fill_from_model, input_embeddings
from slimtune.methods.prompt_learning.stored import StoredPrompt

__all__ = ["PromptLearningConfig", "StoredPrompt", "fill_from_model", "input_embeddings", "prefix_cache",
           "virtual_tokens"]
