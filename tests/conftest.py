import os
import sys
from pathlib import Path

import torch

# Test helper modules (tiny_models, tiny_tokenizer, ...) import by plain name from any tests/ folder.
_HERE = Path(__file__).parent
for folder in [_HERE, *sorted(p for p in _HERE.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))]:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
