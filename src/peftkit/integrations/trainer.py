"""transformers `Trainer` support: adapter-only checkpoints, resume and `load_best_model_at_end`.

`Trainer` recognises only Hugging Face peft's `PeftModel` (`_is_peft_model`); given a peftkit model
it would save the whole state dict (frozen base included) and could not resume from an adapter
folder. `PeftkitTrainerMixin` overrides the three hooks involved:

    _save                   -> model.save_pretrained(dir): adapter_config.json + adapter_model.safetensors
    _load_from_checkpoint   -> load the adapter weights of `checkpoint-N/` into the active adapter
    _load_best_model        -> the same, from `state.best_model_checkpoint`

Use `PeftkitTrainer` in place of `Trainer`, or `with_peftkit(SomeTrainer)` for another Trainer
subclass (e.g. TRL's `SFTTrainer`). Models that are not peftkit models fall through to `Trainer`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer

from ..utils.files import read_weights_file
from ..checkpoint.state_dict import set_peft_model_state_dict
from ..errors import CheckpointError
from ..peft_model import PeftModel
from ..utils.hf_compat import checkpointing_argument, enable_activation_checkpointing

TRAINING_ARGS_NAME = "training_args.bin"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _peftkit_model(trainer: Trainer, model: Optional[nn.Module] = None) -> Optional[PeftModel]:
    """The peftkit model behind `model` (or the trainer's model), unwrapped from accelerate; else None."""
    model = model if model is not None else trainer.model
    unwrapped = trainer.accelerator.unwrap_model(model, keep_torch_compile=False)
    return unwrapped if isinstance(unwrapped, PeftModel) else None


def load_adapter_checkpoint(model: PeftModel, checkpoint_dir: str) -> None:
    """Load `checkpoint_dir`'s adapter weights into `model` (the default adapter and any `dir/<name>/`)."""
    loaded = False
    for name in model.peft_config:
        folder = checkpoint_dir if name == "default" else os.path.join(checkpoint_dir, name)
        path = next((os.path.join(folder, f) for f in ADAPTER_WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
        if path is None:
            continue
        set_peft_model_state_dict(model, read_weights_file(path), adapter_name=name, strict=True)
        loaded = True
    if not loaded:
        raise CheckpointError(
            f"No adapter weights in {checkpoint_dir!r}; was it written by PeftkitTrainer (adapter-only checkpoints)?"
        )


class PeftkitTrainerMixin:
    """Mix into any `transformers.Trainer` subclass (before it) to save and load adapter-only checkpoints."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, enabling activation checkpointing on the base model itself for peftkit models.

        Trainer calls `model.activation_checkpointing_enable(activation_checkpointing_kwargs=...,
        every_n_layers=..., offload=...)`; peftkit's `PeftModel` alias of that method takes
        `gradient_checkpointing_kwargs` instead, so we enable it here and hide the flag from Trainer.
        """
        model = _peftkit_model(self)
        flag = checkpointing_argument(self.args)  # the flag's name moved in transformers 5.23 (hf_compat)
        if model is None or not getattr(self.args, flag):
            return super().train(*args, **kwargs)  # type: ignore[misc]
        options = dict(getattr(self.args, f"{flag}_kwargs", None) or {})
        extra = {key: options.pop(key) for key in ("every_n_layers", "offload") if key in options}
        enable_activation_checkpointing(model.get_base_model(), options or None, **extra)
        model._enable_input_require_grads()
        setattr(self.args, flag, False)
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            setattr(self.args, flag, True)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = _peftkit_model(self)
        if model is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # The full `state_dict` Trainer may pass is not needed: the adapter is read from the model.
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        peft_model = _peftkit_model(self, model)
        if peft_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        load_adapter_checkpoint(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        peft_model = _peftkit_model(self)
        if peft_model is None:
            return super()._load_best_model()  # type: ignore[misc]
        load_adapter_checkpoint(peft_model, self.state.best_model_checkpoint)


class PeftkitTrainer(PeftkitTrainerMixin, Trainer):
    """`transformers.Trainer` that writes and reads adapter-only checkpoints for peftkit models."""


def with_peftkit(trainer_cls: type) -> type:
    """A subclass of `trainer_cls` (e.g. trl's `SFTTrainer`) with peftkit checkpoint handling."""
    return type(f"Peftkit{trainer_cls.__name__}", (PeftkitTrainerMixin, trainer_cls), {})

