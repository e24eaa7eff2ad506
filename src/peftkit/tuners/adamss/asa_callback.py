"""`AdamssAsaCallback`: runs AdaMSS's Adaptive Subspace Allocation from a transformers `Trainer`.

All ASA settings come from the adapter's `AdamssConfig`; the callback only calls
`AdamssModel.update_and_allocate(state.global_step)` after each optimizer step. Custom training
loops call that method themselves. Not exported from `peftkit` (it imports transformers):

    from peftkit.tuners.adamss.asa_callback import AdamssAsaCallback
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class AdamssAsaCallback(TrainerCallback):
    """`Trainer(..., callbacks=[AdamssAsaCallback()])`: ASA on every optimizer step."""

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs.get("model")
        if model is not None:
            tuner = getattr(model, "base_model", model)
            if hasattr(type(tuner), "update_and_allocate"):
                tuner.update_and_allocate(state.global_step)
        return super().on_optimizer_step(args=args, state=state, control=control)
