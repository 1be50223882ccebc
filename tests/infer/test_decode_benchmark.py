"""Smoke test of benchmarks/decode_unmerged.py on the tiny preset (CPU): three modes timed, merged and
unmerged decode produce the same tokens, the table prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_unmerged.py"


def test_decode_benchmark_tiny_cpu(capsys):
    spec = importlib.util.spec_from_file_location("decode_unmerged", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--prompt-len", "8",
                        "--new-tokens", "5", "--repeats", "1", "--batch", "2"])
    assert [r["mode"] for r in rows] == ["unmerged LoRA", "merged LoRA", "base (no adapter)"]
    assert all(r["tokens_per_s"] > 0 and r["seconds"] > 0 for r in rows)
    assert rows[1]["vs_merged"] == 1.0
    assert all(r["same_tokens_as_merged"] for r in rows)
    out = capsys.readouterr().out
    assert "merged and unmerged generate the same tokens: yes" in out and "LoRA r=16 on 7 projections" in out
