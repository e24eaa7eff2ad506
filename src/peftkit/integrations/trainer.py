"""transformers `Trainer` with peftkit models: adapter-only checkpoints, resume and `load_best_model_at_end`.

What `Trainer` does for a peftkit model instead of its defaults (installed behind Trainer's own
methods by `recognition.py`, so user code needs no peftkit class):

    _save                   -> model.save_pretrained(dir): adapter_config.json + adapter_model.safetensors
    _load_from_checkpoint   -> load the adapter weights of `checkpoint-N/` into the adapters
    _load_best_model        -> the same, from `state.best_model_checkpoint`
    train                   -> activation checkpointing enabled on the transformers model inside

Models that are not peftkit models go to Trainer's own code unchanged.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers import Trainer

from ..checkpoint.adapter_folder import read_adapter_weights
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
        if not any(os.path.isfile(os.path.join(folder, f)) for f in ADAPTER_WEIGHT_FILES):
            continue
        set_peft_model_state_dict(model, read_adapter_weights(folder), adapter_name=name, strict=True)
        loaded = True
    if not loaded:
        raise CheckpointError(
            f"No adapter weights in {checkpoint_dir!r}: it is not an adapter-only checkpoint of this model (written "
            "by Trainer for a peftkit model, or by save_pretrained)."
        )


# ---------------------------------------------------------------------- the routed Trainer methods
# `recognition.install()` puts these behind transformers.Trainer's own methods: each gets the
# trainer, the original method and its arguments, and only changes what happens for peftkit models.
def routed__init__(trainer: Trainer, original: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    original(trainer, *args, **kwargs)
    if _peftkit_model(trainer) is not None:
        from .recognition import warn_unrecognised

        warn_unrecognised(trainer)


def routed_train(trainer: Trainer, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`Trainer.train`, enabling activation checkpointing on the base model itself for peftkit models.

    Trainer calls `model.activation_checkpointing_enable(...)` (`gradient_checkpointing_enable`
    before transformers 5.23) with options peftkit's wrapper forwards differently, so it is enabled
    here on the transformers model and the flag hidden from Trainer for the call.
    """
    model = _peftkit_model(trainer)
    flag = checkpointing_argument(trainer.args)  # the flag's name moved in transformers 5.23 (hf_compat)
    if model is None or not getattr(trainer.args, flag):
        return original(trainer, *args, **kwargs)
    options = dict(getattr(trainer.args, f"{flag}_kwargs", None) or {})
    extra = {key: options.pop(key) for key in ("every_n_layers", "offload") if key in options}
    enable_activation_checkpointing(model.get_base_model(), options or None, **extra)
    model._enable_input_require_grads()
    setattr(trainer.args, flag, False)
    try:
        return original(trainer, *args, **kwargs)
    finally:
        setattr(trainer.args, flag, True)


def routed_save(
    trainer: Trainer, original: Callable[..., None], output_dir: Optional[str] = None, state_dict: Optional[dict] = None
) -> None:
    """Adapter-only checkpoints for peftkit models: `save_pretrained` (config, weights, model card)."""
    model = _peftkit_model(trainer)
    if model is None:
        return original(trainer, output_dir, state_dict)
    output_dir = output_dir if output_dir is not None else trainer.args.output_dir
    if not trainer.args.should_save:
        return
    os.makedirs(output_dir, exist_ok=True)
    # The full `state_dict` Trainer may pass is not needed: the adapter is read from the model.
    model.save_pretrained(output_dir, is_main_process=trainer.args.should_save)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


def routed_load_from_checkpoint(
    trainer: Trainer, original: Callable[..., None], resume_from_checkpoint: str, model: Optional[nn.Module] = None
) -> None:
    peft_model = _peftkit_model(trainer, model)
    if peft_model is None:
        return original(trainer, resume_from_checkpoint, model)
    load_adapter_checkpoint(peft_model, resume_from_checkpoint)


def routed_load_best_model(trainer: Trainer, original: Callable[..., None]) -> None:
    peft_model = _peftkit_model(trainer)
    if peft_model is None:
        return original(trainer)
    load_adapter_checkpoint(peft_model, trainer.state.best_model_checkpoint)


class PeftkitTrainer(Trainer):
    """`transformers.Trainer` itself handles peftkit models since `import peftkit` (`recognition.py`);
    this name is kept for code written against earlier peftkit versions."""


#: Kept for code written against earlier peftkit versions: plain Trainer subclasses handle peftkit
#: models already, so the mixin adds nothing.
class PeftkitTrainerMixin:
    """Deprecated no-op: transformers' Trainer (and its subclasses) handle peftkit models since `import peftkit`."""


def with_peftkit(trainer_cls: type) -> type:
    """`trainer_cls` itself: every Trainer subclass handles peftkit models since `import peftkit` (kept for
    code written against earlier peftkit versions)."""
    return trainer_cls
