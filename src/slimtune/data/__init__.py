"""slimtune.data: the SFT data pipeline — formats, validation, templates, loss masks, packing, collation.

    data = build_datasets(DataConfig(path="train.jsonl"), tokenizer, max_seq_len=1024, seed=0)
    collate = SFTCollator(tokenizer.pad_token_id, packed_attention=cfg.packed_attention)
"""

from slimtune.data.collate import SFTCollator, block_causal_mask
from slimtune.data.config import DataConfig
from slimtune.data.formats import Sample, detect_format, to_sample
from slimtune.data.inspect import InspectReport, inspect_data
from slimtune.data.packing import length_grouped_batches, pack_examples
from slimtune.data.pipeline import Datasets, DataStats, build_datasets, load_samples
from slimtune.data.templates import ChatTemplate, render, resolve_template
from slimtune.data.tokenize import IGNORE_INDEX, TemplateError, tokenize_sample
from slimtune.data.tokenizer_setup import eot_token_ids, prepare_tokenizer, save_tokenizer_for_run
from slimtune.data.validation import RowError

__all__ = [
    "IGNORE_INDEX",
    "ChatTemplate",
    "DataConfig",
    "DataStats",
    "Datasets",
    "InspectReport",
    "RowError",
    "SFTCollator",
    "Sample",
    "TemplateError",
    "block_causal_mask",
    "build_datasets",
    "detect_format",
    "eot_token_ids",
    "inspect_data",
    "length_grouped_batches",
    "load_samples",
    "pack_examples",
    "prepare_tokenizer",
    "render",
    "resolve_template",
    "save_tokenizer_for_run",
    "to_sample",
    "tokenize_sample",
]
