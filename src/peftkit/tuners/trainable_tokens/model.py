"""`TrainableTokensModel`: the Trainable Tokens tuner -- wraps embeddings in `TrainableTokensLayer`s.

The layer is the one LoRA's `trainable_token_indices` uses (`tuners/_core/trainable_tokens.py`),
here placed directly on the embedding. With `tie_word_embeddings` the output layers tied to the
input embedding get a layer tied to the embedding's: they share its rows and stay in sync.

Checkpoints (as peft writes them; the rows are saved, never the whole matrix):

    <embedding>.trainable_tokens_delta (len(token_indices), embedding_dim)
    <tied output layer>.trainable_tokens_delta                    (the same values, under tying)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from .._core.module_tree import get_submodules, input_embedding_name, replace_module
from .._core.trainable_tokens import TrainableTokensLayer
from .._core.tuner import BaseTuner
from .config import TrainableTokensConfig

SUPPORTED_LAYERS = "torch.nn.Embedding (and torch.nn.Linear, e.g. an output layer)"
_TIED_MERGE_WARNING = "Model with `tie_word_embeddings=True`"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def dispatch_embedding(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[nn.Module]:
    """A `TrainableTokensLayer` over an embedding (or a linear layer); the layer refuses other types."""
    return TrainableTokensLayer(target, adapter_name, standalone=True, **kwargs)


class TrainableTokensModel(BaseTuner):
    """Creates Trainable Tokens adapters: `TrainableTokensModel(model, TrainableTokensConfig(...), "default")`."""

    prefix = "trainable_tokens_"
    layer_cls = TrainableTokensLayer
    dispatchers = (dispatch_embedding,)
    display_name = "Trainable Tokens"
    supported_layers = SUPPORTED_LAYERS

    def _prepare_adapter_config(self, config: TrainableTokensConfig) -> TrainableTokensConfig:
        """No target_modules: the input embedding's path (peft's rule: `"embed_tokens"` without one)."""
        if config.target_modules is None:
            config.target_modules = input_embedding_name(self.model) or "embed_tokens"
        return super()._prepare_adapter_config(config)

    def layer_kwargs(self, config: TrainableTokensConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"token_indices": config.token_indices, "init_weights": config.init_weights}

    # ------------------------------------------------------------------ tied output layers
    def _inject(self, adapter_name: str, config: Any, targets: Optional[set[str]] = None) -> None:
        super()._inject(adapter_name, config, targets)
        self._tie_output_layers(adapter_name)

    def _tie_output_layers(self, adapter_name: str) -> None:
        """Under `tie_word_embeddings`, layers sharing the (wrapped) input embedding's weight share its rows."""
        model_config = getattr(self.model, "config", None)
        if not getattr(model_config, "tie_word_embeddings", False) or not hasattr(self.model, "get_input_embeddings"):
            return
        embedding = self.model.get_input_embeddings()
        if not isinstance(embedding, TrainableTokensLayer):
            return
        weight = embedding.get_base_layer().weight
        for key, module in self._tied_modules(weight, embedding):
            if isinstance(module, TrainableTokensLayer) and module.tied_adapter is embedding:
                continue  # already follows the embedding's layer: it shares every adapter
            base = module.base_layer if isinstance(module, TrainableTokensLayer) else module
            parent, _, name = get_submodules(self.model, key)
            tied = TrainableTokensLayer(base, adapter_name, [], tied_adapter=embedding, standalone=True)
            replace_module(parent, name, tied)
            tied.set_adapter(embedding.active_adapters)

    def _tied_modules(self, weight: torch.Tensor, embedding: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        layers = [key for key, module in self.model.named_modules() if isinstance(module, TrainableTokensLayer)]
        for key, module in list(self.model.named_modules(remove_duplicate=False)):
            if module is embedding or not key or any(key.startswith(layer + ".") for layer in layers):
                continue
            inner = module.base_layer if isinstance(module, TrainableTokensLayer) else module
            if type(inner) is nn.Linear and inner.weight is weight:
                yield key, module

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        """Also unwrap the tied layers whose embedding layer is gone or holds no adapter any more."""
        super()._remove_adapter_from_layers(adapter_name)
        for key, layer in list(self.tuner_layers())[::-1]:
            tied = getattr(layer, "tied_adapter", None)
            if tied is not None and not tied.adapter_names():
                parent, _, name = get_submodules(self.model, key)
                replace_module(parent, name, layer.unwrapped())

    # ------------------------------------------------------------------ dtype, merging
    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's autocast: fp16/bf16 rows (and their originals) become fp32; without it, the base dtype."""
        super().cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for _, layer in self.tuner_layers():
            if layer.tied_adapter is not None:
                continue
            delta = layer.trainable_tokens_delta[adapter_name] if adapter_name in layer.trainable_tokens_delta else None
            if delta is not None and delta.dtype in _LOW_PRECISION:
                delta.data = delta.data.float()
            originals = layer.trainable_tokens_original
            if adapter_name in originals and originals[adapter_name].dtype in _LOW_PRECISION:
                originals[adapter_name] = originals[adapter_name].float()

    @contextmanager
    def _tied_rows_merge(self) -> Iterator[None]:
        """peft merges tied rows without its tied-embedding warning: the rows are shared on purpose."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TIED_MERGE_WARNING)
            yield

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        with self._tied_rows_merge():
            super().merge_adapter(adapter_names, safe_merge)

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                adapter_names: Optional[list[str]] = None) -> nn.Module:
        with self._tied_rows_merge():
            return super()._unload(merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)


__all__ = ["TrainableTokensModel", "dispatch_embedding"]
