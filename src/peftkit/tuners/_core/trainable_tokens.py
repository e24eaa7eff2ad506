r"""Trainable token rows: train only some rows of an embedding (new special tokens, a chat template).

    W'[i] = T_a[k]   for the k-th index i of adapter a's `token_indices`,   W'[i] = W[i] otherwise

The rows are *replaced*, not offset: `trainable_tokens_delta[a]` holds the rows' values (initialised
as copies of the base rows, or random with `init_weights=False`), `trainable_tokens_original[a]`
the base rows (a non-persistent buffer, for unmerging). Replacing keeps the result defined when an
embedding is resized (new random rows) and the adapter later loaded on a fresh resize.

`TrainableTokensLayer` is the tuner layer (peft's `TRAINABLE_TOKENS` method uses it directly);
`TrainableTokensWrapper` puts one beside another method, for LoRA's `trainable_token_indices`, as an
`AuxiliaryWrapper` named `token_adapter` (checkpoint key `<embedding>.token_adapter.trainable_tokens_delta`).
An output layer tied to the embedding (`tie_word_embeddings`) gets a layer that shares the tied
embedding's tensors: it is kept in sync and, beside LoRA, is not saved a second time. As the layer
of the method itself (`standalone=True`, peft's `TrainableTokensModel`) a tied layer writes its own
key too (`lm_head.trainable_tokens_delta`, the same values, as peft's files have it), and an empty
`token_indices` (the config's default) is a no-op adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .buffer_dict import BufferDict
from .layer import BaseTunerLayer
from .module_tree import input_embedding_name
from .modules_to_save import AuxiliaryWrapper


class TrainableTokensLayer(BaseTunerLayer, nn.Module):
    """Trainable rows of an `nn.Embedding` (or of an output `nn.Linear` tied to one); see the module docstring."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        token_indices: list[int],
        init_weights: bool = True,
        tied_adapter: Optional["TrainableTokensLayer"] = None,
        standalone: bool = False,
    ) -> None:
        super().__init__()
        self.standalone = standalone
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise ConfigError(
                f"Trainable tokens need an nn.Embedding (or an nn.Linear tied to one), got {type(base).__name__}; "
                "point trainable_token_indices / target_modules at the embedding layer."
            )
        self._init_tuner_layer(base_layer)
        if isinstance(base, nn.Embedding):
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        # A tied layer shares the tensors of the layer it is tied to (kept in a list: not a submodule,
        # so its tensors appear once in state dicts).
        self._tied = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original = BufferDict(persistent=False)
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, token_indices, init_weights)

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        return self._tied[0] if self._tied else None

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True, **_: Any) -> None:
        """Add `adapter_name`'s rows (a tied layer follows the layer it is tied to and adds nothing)."""
        if self.tied_adapter is not None:
            return
        weight = self.get_base_layer().weight
        indices = _checked_indices(token_indices, weight.shape[0], allow_empty=self.standalone)
        originals = weight.detach()[indices]
        values = originals.clone() if init_weights else torch.randn_like(originals)
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values)
        self.trainable_tokens_original[adapter_name] = originals.clone()
        self.set_adapter(self.active_adapters or [adapter_name])

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        if self.tied_adapter is not None and not self.standalone:
            return {}
        return super().adapter_state(adapter_name, prefix)

    def delete_adapter(self, adapter_name: str) -> None:
        if self.tied_adapter is None:
            super().delete_adapter(adapter_name)
        elif adapter_name in self._active_adapter:  # the shared tensors are the tied layer's to delete
            self._active_adapter = [name for name in self._active_adapter if name != adapter_name]

    def _check_overlapping_tokens(self, adapter_names: list[str]) -> None:
        """Adapters used together (active or merged) must touch disjoint rows: replacements do not compose."""
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + list(adapter_names)):
            rows = set(self.token_indices[name])
            if seen & rows:
                raise ConfigError(
                    f"Token indices of adapter {name} are already defined and would result in undefined merging "
                    "behavior. Only disjunct token indices are currently supported."
                )
            seen |= rows

    # ------------------------------------------------------------------ the weight with the rows replaced
    def _rows(self, adapter_name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(self.token_indices[adapter_name], dtype=torch.long, device=like.device)
        return index, self.trainable_tokens_delta[adapter_name].to(like)

    def get_merged_weights(self, adapter_names: list[str]) -> torch.Tensor:
        """The base weight with each adapter's rows in place (differentiable in the rows)."""
        weight = self.get_base_layer().weight
        for name in adapter_names:
            index, rows = self._rows(name, weight)
            weight = weight.index_copy(0, index, rows)
        return weight

    def fold(self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self._check_overlapping_tokens([adapter_name])
        index, rows = self._rows(adapter_name, weight)
        return weight.index_copy(0, index, rows), bias

    def unfold(self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        index = torch.tensor(self.token_indices[adapter_name], dtype=torch.long, device=weight.device)
        return weight.index_copy(0, index, self.trainable_tokens_original[adapter_name].to(weight)), bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward_adapters(x, self.active_adapters, *args, **kwargs)

    def forward_adapters(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output with `adapter_names`' rows (none, disabled or merged: the base output)."""
        names = [name for name in adapter_names if name in self.trainable_tokens_delta]
        if self._disable_adapters or not names:
            if self.merged and self._disable_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        self._check_overlapping_tokens(names)
        weight = self.get_merged_weights(names)
        base = self.get_base_layer()
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled embeddings apply it in forward
            return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out
        return F.linear(x, weight)  # an output layer tied to the embedding (as peft: its bias is not used)

    def __repr__(self) -> str:
        return "trainable_tokens." + super().__repr__()


def _checked_indices(token_indices: Any, num_rows: int, allow_empty: bool = False) -> list[int]:
    if not isinstance(token_indices, (list, tuple)) or not (token_indices or allow_empty):
        raise ConfigError(f"token indices must be a non-empty list of ints, got {token_indices!r}.")
    bad = [i for i in token_indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_rows]
    if bad:
        raise ConfigError(
            f"token indices {bad[:10]}{f' (and {len(bad) - 10} more)' if len(bad) > 10 else ''} are not rows of an "
            f"embedding with {num_rows} rows; use ints in [0, {num_rows})."
        )
    return list(token_indices)


class TrainableTokensWrapper(AuxiliaryWrapper):
    """Trainable token rows beside another method (LoRA's `trainable_token_indices`), under `token_adapter`."""

    adapter_layer_names = ("token_adapter.trainable_tokens_delta",)
    other_param_names = ("token_adapter.token_indices", "token_adapter.trainable_tokens_original")
    base_attribute = "token_adapter"

    def __init__(
        self,
        module: nn.Module,
        adapter_name: str,
        token_indices: list[int],
        tied_adapter: Optional[TrainableTokensLayer] = None,
    ) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(module, adapter_name, token_indices, tied_adapter=tied_adapter)
        self._init_wrapper(adapter_name)
        self.set_adapter([adapter_name])

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the model sees it (rows replaced), for code that reads `embed.weight`."""
        name = self._current()
        return self.token_adapter.get_merged_weights([] if name is None else [name])

    def update(self, adapter_name: str, token_indices: list[int]) -> None:
        if adapter_name not in self.token_adapter.trainable_tokens_delta:
            self.token_adapter.update_layer(adapter_name, token_indices)
        self.set_adapter(self._active_adapter)

    def held_adapters(self) -> list[str]:
        return list(self.token_adapter.trainable_tokens_delta.keys())

    def adapter_tensors(self, adapter_name: str) -> Iterator[torch.Tensor]:
        yield self.token_adapter.trainable_tokens_delta[adapter_name]

    def forward_with(self, adapter_name: Optional[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.token_adapter.forward_adapters(x, [] if adapter_name is None else [adapter_name], *args, **kwargs)

    def set_adapter(self, adapter_names: Any, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode)
        self.token_adapter._active_adapter = list(self._active_adapter)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.token_adapter._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        self.token_adapter.delete_adapter(adapter_name)
        if adapter_name in self._active_adapter:
            self._active_adapter = [name for name in self._active_adapter if name != adapter_name]
        self.token_adapter._active_adapter = list(self._active_adapter)

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        return self.token_adapter.adapter_state(adapter_name, f"{prefix}.token_adapter")

    def unloaded(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        """The embedding, with the rows merged in when `merge` (of the active adapter by default)."""
        if merge and self.token_adapter.tied_adapter is None:
            names = [n for n in (adapter_names or self._active_adapter) if n in self.held_adapters()]
            if names:
                self.token_adapter.merge(safe_merge=safe_merge, adapter_names=names)
        return self.token_adapter.get_base_layer()


def token_targets(model: nn.Module, trainable_token_indices: Any) -> dict[str, list[int]]:
    """{module name: row indices} from a config's `trainable_token_indices` (a list means the input embedding)."""
    if isinstance(trainable_token_indices, dict):
        return dict(trainable_token_indices)
    return {input_embedding_name(model) or "embed_tokens": trainable_token_indices}
