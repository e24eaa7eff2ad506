"""`ModulesToSaveWrapper`: a fully trainable copy of a whole module per adapter (e.g. a classifier head),
on `AuxiliaryWrapper`, what it shares with the trainable-token rows of `trainable_tokens.py`.

The original stays frozen and is used when adapters are disabled or the active adapter has no
copy; checkpoints hold the copy under the original module's keys (`classifier.weight`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from torch import nn

from ...errors import AdapterStateError
from .call_state import batch_adapter_names


class AuxiliaryWrapper(nn.Module):
    """Per-adapter trainable state on a module that is not a tuner layer (peft's "auxiliary training
    wrapper"): a full trainable copy (`ModulesToSaveWrapper`) or trainable token rows
    (`trainable_tokens.TrainableTokensWrapper`).

    At most one adapter is active per wrapper (copies and token rows are not additive). Subclasses
    say which adapters they hold and their tensors; switching, freezing and mixed batches are here.
    """

    #: As a tuner layer's: the attributes holding per-adapter tensors (peft's names).
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    #: The attribute a base-model state dict walks through (the wrapped original module's path).
    base_attribute: str = "original_module"

    def _init_wrapper(self, adapter_name: str) -> None:
        self._active_adapter = [adapter_name]
        self._disable_adapters = False
        # A mixed-adapter call's row names travel with the call (`call_state.py`), not on this module.

    # ------------------------------------------------------------------ what a subclass holds
    def held_adapters(self) -> list[str]:
        """The adapters with state in this wrapper."""
        raise NotImplementedError

    def adapter_tensors(self, adapter_name: str) -> Iterator[torch.Tensor]:
        """The trainable tensors of `adapter_name` here."""
        raise NotImplementedError

    def forward_with(self, adapter_name: Optional[str], *args: Any, **kwargs: Any) -> Any:
        """The output with `adapter_name`'s state (None or an adapter not held here: the original)."""
        raise NotImplementedError

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unloaded(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        """The module that replaces this wrapper when adapters are unloaded."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour
    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name, or `[]` when no active adapter has state here (as peft)."""
        return self._active_adapter[0] if self._active_adapter else []

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def _current(self) -> Optional[str]:
        name = self.active_adapter
        if self._disable_adapters or not self._active_adapter or name not in self.held_adapters():
            return None
        return name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        batch_names = batch_adapter_names()
        if batch_names is not None and not self._disable_adapters:
            return self._mixed_forward(batch_names, args[0], *args[1:], **kwargs)
        return self.forward_with(self._current(), *args, **kwargs)

    def _mixed_forward(self, batch_names: tuple[str, ...], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Rows of a mixed-adapter batch (`batch_names`: the call's row adapters) each go through their
        adapter's state (or the original)."""
        repeat = x.shape[0] // len(batch_names)
        names = [name for name in batch_names for _ in range(repeat)]
        output = None
        held = self.held_adapters()
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            part = self.forward_with(name if name in held else None, x.index_select(0, rows), *args, **kwargs)
            output = part.new_zeros((x.shape[0],) + part.shape[1:]) if output is None else output
            output = output.index_copy(0, rows, part)
        return output

    def check_set_adapter(self, adapter_names: Union[str, list[str]]) -> list[str]:
        """The adapter this wrapper activates for `adapter_names`: the one of them it holds, or none
        (`[]`: the original module runs); several may not share a wrapper (peft's rule and message)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = [name for name in names if name in self.held_adapters()]
        if len(held) > 1:
            raise AdapterStateError(
                f"Only one adapter can be set at a time for {type(self).__name__}, got {len(held)}: {held} each "
                "have their own state in this module, which is not additive. Activate them one at a time, or give "
                "them different modules."
            )
        return held

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate the (single) named adapter held here; only it trains (none with `inference_mode`)."""
        names = self.check_set_adapter(adapter_names)
        for name in self.held_adapters():
            for tensor in self.adapter_tensors(name):
                tensor.requires_grad_(name in names and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self._active_adapter)
        else:
            for name in self.held_adapters():
                for tensor in self.adapter_tensors(name):
                    tensor.requires_grad_(False)
        self._disable_adapters = not enabled


class ModulesToSaveWrapper(AuxiliaryWrapper):
    """Holds `original_module` and one trainable deep copy of it per adapter."""

    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._init_wrapper(adapter_name)
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for `adapter_name`."""
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        self.set_adapter(self._active_adapter)

    def held_adapters(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_tensors(self, adapter_name: str) -> Iterator[torch.Tensor]:
        return self.modules_to_save[adapter_name].parameters()

    def _active_module(self) -> nn.Module:
        name = self._current()
        return self.original_module if name is None else self.modules_to_save[name]

    @property
    def weight(self) -> torch.Tensor:
        return self._active_module().weight

    #: Modules whose copies can serve a mixed-adapter batch (split by rows), as in peft.
    mixed_batch_modules = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def _mixed_forward(self, batch_names: tuple[str, ...], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(self.original_module, self.mixed_batch_modules):
            names = ", ".join(cls.__name__ for cls in self.mixed_batch_modules)
            raise TypeError(
                f"Mixed batching is only supported for the following modules: {names}. This modules_to_save copy "
                f"is a {type(self.original_module).__name__}; run such adapters one at a time."
            )
        return super()._mixed_forward(batch_names, x, *args, **kwargs)

    def forward_with(self, adapter_name: Optional[str], *args: Any, **kwargs: Any) -> Any:
        module = self.original_module if adapter_name is None else self.modules_to_save[adapter_name]
        return module(*args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if adapter_name in self._active_adapter and len(self.modules_to_save):
            self._active_adapter = [next(iter(self.modules_to_save.keys()))]

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint keys are the original module's own: `<prefix>.<param>`."""
        if adapter_name not in self.modules_to_save:
            return {}
        module = self.modules_to_save[adapter_name]
        return {f"{prefix}.{name}": tensor for name, tensor in module.state_dict(keep_vars=True).items()}

    def resolve(self, adapter_name: str) -> nn.Module:
        """The module to keep when unloading: the adapter's copy if it has one, else the original."""
        held = isinstance(adapter_name, str) and adapter_name in self.modules_to_save
        return self.modules_to_save[adapter_name] if held else self.original_module

    def unloaded(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        """As peft: the trained copy of the active adapter replaces the original, merged or not."""
        return self.resolve(self.active_adapter)
