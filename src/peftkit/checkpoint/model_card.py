"""The model card (`README.md`) `save_pretrained` writes beside each adapter, as peft's does.

Metadata (the YAML block the hub and peft tooling read): `library_name: peft`, `base_model` (the
base model's `config._name_or_path`, when the model has a transformers config), `tags` (the base
model's `model_tags`, `transformers` for a transformers model, `lora` for LoRA adapters,
`base_model:adapter:<base model>`), and `pipeline_tag: text-generation` for causal LMs. An existing
`README.md` keeps its text and its other metadata; only these keys are set. The text gets a
"Framework versions" line naming peftkit, and the quantization config when the base has one.

`model_card_text` only computes the text; `adapter_folder.write_adapter` commits it together
with the config and the weights.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional

from torch import nn

README_NAME = "README.md"
_QUANTIZATION_PREFIX = "The following quantization config was used during training:"
_TRAINING_HEADING = "## Training procedure"
_FRAMEWORK_HEADING = "### Framework versions"


@dataclasses.dataclass(frozen=True)
class ModelCardInfo:
    """What the card says about one saved adapter (read from the live model by `model_card_info`)."""

    base_model: Optional[str]
    tags: tuple[str, ...]
    pipeline_tag: Optional[str]
    quantization_config: Optional[dict[str, Any]]


def _config_dict(model: nn.Module) -> Optional[dict[str, Any]]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config) if isinstance(config, dict) else None


def model_card_info(base_model: nn.Module, peft_type: Any, causal_lm: bool = False) -> ModelCardInfo:
    """The card's facts for an adapter of `peft_type` on `base_model` (the user's model, adapters injected)."""
    PreTrainedModel = _pretrained_model_class()

    config = _config_dict(base_model)
    base_name = config.get("_name_or_path") if config else None
    tags = set(getattr(base_model, "model_tags", None) or [])
    if isinstance(base_model, PreTrainedModel):
        tags.add("transformers")
    if str(getattr(peft_type, "value", peft_type)) == "LORA":
        tags.add("lora")
    name_or_path = getattr(base_model, "name_or_path", None)
    if name_or_path is not None:
        tags.add(f"base_model:adapter:{name_or_path}")
    quant = (config or {}).get("quantization_config")
    if quant is not None and hasattr(quant, "to_dict"):
        quant = quant.to_dict()
    return ModelCardInfo(
        base_model=base_name if config is not None and "_name_or_path" in config else None,
        tags=tuple(sorted(tags)),
        pipeline_tag="text-generation" if causal_lm else None,
        quantization_config=dict(quant) if isinstance(quant, dict) else None,
    )


def _as_list(value: Any) -> list:
    """A card's `tags` as a list (YAML allows one tag written as a plain string)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _existing_tags(text: str) -> list:
    """The `tags` of a card's YAML front matter, read from the text itself.

    Not from `ModelCard(text).data`: huggingface_hub before 1.40 or so turns `tags: mine` into
    `["m", "i", "n", "e"]` there.
    """
    import yaml

    if not text.startswith("---"):
        return []
    head, sep, _ = text[3:].partition("\n---")
    if not sep:
        return []
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError:
        return []
    return _as_list(data.get("tags")) if isinstance(data, dict) else []


def _new_card() -> Any:
    from huggingface_hub import ModelCard, ModelCardData

    try:
        return ModelCard.from_template(ModelCardData())  # the hub's default template (needs jinja2)
    except ImportError:
        return ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n\n# Model Card\n")


def model_card_text(info: ModelCardInfo, existing: Optional[str] = None) -> str:
    """The `README.md` text: `existing` (a card's text, or None for a new one) with peft's metadata set."""
    from huggingface_hub import ModelCard

    from .. import __version__

    card = ModelCard(existing) if existing is not None else _new_card()
    card.data["library_name"] = "peft"
    if info.tags:
        before = _existing_tags(existing) if existing is not None else _as_list(card.data.get("tags"))
        card.data["tags"] = sorted(set(map(str, before)) | set(info.tags))
    if not card.data.get("pipeline_tag") and info.pipeline_tag:
        card.data["pipeline_tag"] = info.pipeline_tag
    if info.base_model is not None:
        card.data["base_model"] = info.base_model

    lines = card.text.splitlines()
    if info.quantization_config and _QUANTIZATION_PREFIX not in lines:
        block = f"\n{_QUANTIZATION_PREFIX}\n" + "\n".join(f"- {k}: {v}" for k, v in info.quantization_config.items()) + "\n"
        if _TRAINING_HEADING in lines:
            lines.insert(lines.index(_TRAINING_HEADING) + 2, block)
        else:
            lines.append(f"{_TRAINING_HEADING}\n{block}")
    version_line = f"- peftkit {__version__} (PEFT-compatible)"
    if version_line not in lines:
        if _FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(_FRAMEWORK_HEADING) + 2, version_line)
        else:
            lines.append(f"{_FRAMEWORK_HEADING}\n\n{version_line}")
    card.text = "\n".join(lines)
    return str(card)


def read_existing_card(directory: str) -> Optional[str]:
    """The text of `directory/README.md`, or None when there is none (or it cannot be read as text)."""
    path = os.path.join(directory, README_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def _pretrained_model_class() -> tuple:
    """`(transformers.PreTrainedModel,)` if transformers' modeling code is loaded, else `()`: a model can
    only be a PreTrainedModel once it is, and importing it costs seconds (a save must not pay that)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    cls = getattr(modeling, "PreTrainedModel", None)
    return (cls,) if cls is not None else ()
