"""slimtune.train: the training loop, run config, checkpoint/resume and run reporting.

    cfg = load_run_config("examples/lora.yaml", ["--train.max_steps", "100"])
    result = run_training(cfg)              # what `slimtune train` does
    result = run_training(cfg, resume=True) # continue from output_dir/checkpoints
"""

from slimtune.train.config import TrainConfig
from slimtune.train.loop import Trainer, TrainingDiverged
from slimtune.train.run import RunResult, run_training
from slimtune.train.run_config import QuantConfig, RunConfig, load_run_config

__all__ = [
    "QuantConfig",
    "RunConfig",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "load_run_config",
    "run_training",
]
