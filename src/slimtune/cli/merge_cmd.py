"""`slimtune merge`: fold an adapter into its base model and save a plain transformers model.

Its options are the fields of slimtune.infer.config.MergeConfig. Registered in main.py.
"""

from __future__ import annotations

from slimtune.cli.common import console, quiet_transformers
from slimtune.cli.options import config_command
from slimtune.infer.config import MergeConfig


def run_merge(cfg: MergeConfig) -> None:
    from slimtune.infer.merge import merge_to_dir

    quiet_transformers()
    report = merge_to_dir(cfg.model, cfg.adapter, cfg.output, cfg.quantization, cfg.dtype, cfg.device,
                          cfg.max_logit_diff)
    base = "4-bit base dequantized" if report.quantized_base else "base"
    console.print(f"merged ({base}, {report.dtype}): max |logit diff| {report.max_logit_diff:.3g} "
                  f"<= {report.threshold:.3g}; saved to {report.output}", highlight=False)


merge_command = config_command(run_merge, MergeConfig, doc="""\
Merge an adapter into its base; checks merged vs unmerged logits before writing anything.

Example: `slimtune merge --model base/ --adapter runs/a/adapter --output runs/a/merged`
""")
