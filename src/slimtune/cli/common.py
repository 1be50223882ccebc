"""What every `slimtune` command shares: the console, exit codes, and `guarded`, which runs a command body.

User mistakes (ValueError and its subclasses, slimtune.errors.SlimtuneError, a missing or unreadable file)
print one red line and exit with code 2; a diverged run, running out of GPU memory or a failing disk exits
with 1. Anything else is a bug and keeps its traceback. Set SLIMTUNE_DEBUG=1 to see the traceback of a user
error too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["EXIT_DIVERGED", "EXIT_USER_ERROR", "console", "guarded", "quiet_transformers"]

console = Console(stderr=True)
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1


def guarded(body: Callable[[], Any], interrupted: str = "interrupted") -> None:
    """Run a command body, turning user errors into one red line and an exit code; bugs propagate."""
    import torch

    from slimtune.train.loop import TrainingDiverged

    try:
        body()
    except TrainingDiverged as err:
        _fail(str(err), EXIT_DIVERGED, err)
    except torch.OutOfMemoryError as err:
        _fail("out of GPU memory: lower train.batch_size (raise train.grad_accum to keep the batch), set "
              "train.gradient_checkpointing true, lower train.max_seq_len, or use method qlora", EXIT_DIVERGED, err)
    except (ValueError, FileNotFoundError, PermissionError) as err:  # SlimtuneError is a ValueError
        _fail(str(err), EXIT_USER_ERROR, err)
    except OSError as err:  # a full disk (see train.checkpoint.write_failure), a dead network share, ...
        _fail(str(err), EXIT_DIVERGED, err)
    except KeyboardInterrupt as err:
        _fail(interrupted, 130, err)


def _fail(message: str, code: int, err: BaseException) -> None:
    if os.environ.get("SLIMTUNE_DEBUG"):
        raise err
    text = " ".join(message.split()) or type(err).__name__
    console.print(f"[bold red]error:[/bold red] [red]{escape(text)}[/red]", soft_wrap=True)
    raise typer.Exit(code)


def quiet_transformers() -> None:
    """Hide transformers' per-file progress bars; our own output says what happens."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
