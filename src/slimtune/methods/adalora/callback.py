"""AdaLoraCallback: runs AdaLoRA's rank allocator under transformers.Trainer (a public TrainerCallback).

transformers (>= 5.17, checked on 5.24) calls, per optimizer step: on_pre_optimizer_step, optimizer.step(),
on_optimizer_step, scheduler step, model.zero_grad(), global_step += 1, on_step_end. The allocator needs
the updated weights *and* this step's gradients, which only on_optimizer_step sees, so the callback hooks
there, with the step numbered from 0 as in peft's examples (state.global_step is not yet incremented).
It works with slimtune's PeftModel and with peft's (whose allocator is `model.base_model.update_and_allocate`).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class AdaLoraCallback(TrainerCallback):
    """`Trainer(..., callbacks=[AdaLoraCallback()])`: calls model.update_and_allocate(step) after each optimizer step."""

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          model: Any = None, **kwargs: Any) -> None:
        hook = getattr(model, "update_and_allocate", None)
        if hook is None:
            hook = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
        if hook is None:
            raise ValueError(
                f"AdaLoraCallback needs a model with update_and_allocate (an AdaLoRA PeftModel); got {type(model).__name__}"
            )
        hook(state.global_step)
