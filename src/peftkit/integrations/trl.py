"""TRL `SFTTrainer` with a peftkit model (TRL is an optional dependency; tested with trl 1.16).

    from peftkit.integrations.trl import PeftkitSFTTrainer
    trainer = PeftkitSFTTrainer(model=get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", ...)),
                                args=SFTConfig(...), train_dataset=..., processing_class=tokenizer)

Do not pass `peft_config=` (TRL would build a Hugging Face peft model); wrap the model with peftkit
first. Two things differ from plain `SFTTrainer`:
- checkpoints hold the adapter only (`PeftkitTrainerMixin`), and resume / load-best read them back;
- TRL patches a fused LM-head forward onto the model. It recognises only peft's `PeftModel`, so it
  patches our wrapper instead of the transformers model inside it; we move the patch to
  `model.get_base_model()`, where TRL puts it for peft models.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from .trainer import PeftkitTrainerMixin, _peftkit_model

#: What TRL 1.16's SFTTrainer asks the fused head for (see trl.trainer.sft_trainer).
_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class PeftkitSFTTrainer(PeftkitTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` for peftkit models: adapter-only checkpoints, fused LM head on the base model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("peft_config") is not None:
            raise ValueError("PeftkitSFTTrainer takes a model already wrapped by peftkit.get_peft_model; drop peft_config.")
        super().__init__(*args, **kwargs)
        model = _peftkit_model(self)
        if model is not None and "forward" in vars(model):
            from trl.trainer.utils import add_fused_lm_head

            del model.forward  # TRL's instance-level patch on the wrapper
            add_fused_lm_head(model.get_base_model(), outputs=_FUSED_OUTPUTS)
