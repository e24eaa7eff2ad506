"""Adapter tensors that one adapter shares across every layer it wraps, held by the tuner.

VB-LoRA (the vector bank), UniLoRA (`theta_d`) and RandLoRA (the random bases) give each adapter
one tensor that all of its layers read. As in peft, the tuner owns a per-adapter container and
every layer registers *the same container object* under the same attribute name:

    tuner.vblora_vector_bank            ParameterDict {adapter: (num_vectors, vector_length)}
      ├── model...q_proj.vblora_vector_bank   (the same object)
      └── model...v_proj.vblora_vector_bank   (the same object)

so `named_parameters()` lists the tensor once (under the first layer), training updates it once,
and replacing an entry on the tuner (`tuner.vblora_vector_bank["default"] = t`) is seen everywhere.

Checkpoints hold the shared tensor once, under a key peft writes at the tuner level:
`base_model.<attribute>` (e.g. `base_model.vblora_vector_bank`), not under a module path. The
layers leave shared containers out of their own checkpoint keys (`SharedTensorsLayer`), and the
tuner adds them (`SharedTensorsTuner`): `extra_adapter_state` names them `base_model.<attribute>`,
which the checkpoint code prefixes like any key (`base_model.model.base_model.<attribute>`);
`state_for_save` drops that prefix again, and on loading the checkpoint code's prefix rule maps
peft's `base_model.<attribute>` straight back to it.

This module also has the pieces the three methods share besides: a `BufferDict` (frozen
per-adapter tensors, persistent or not), the bias options (`bias="all"` / `"<prefix>only"`) and
the error raised for layer types a method cannot wrap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ...errors import TargetModulesError
from .._core.base_layers import base_of
from .._core.buffer_dict import BufferDict
from .._core.layer import BaseTunerLayer
from .._core.bias import BiasOptions
from .._core.tuner import BaseTuner
from .._core.tuner_keys import TUNER_KEY_PREFIX, tuner_keys_as_peft


class UnsupportedLayerError(TargetModulesError, TypeError):
    """A target's layer type is one the method cannot wrap (a TypeError, as peft raises it)."""


# ---------------------------------------------------------------------------------------------- layers
class SharedTensorsLayer(BaseTunerLayer):
    """A tuner layer some of whose per-adapter containers (`shared_layer_names`) belong to the tuner.

    Those containers hold every adapter of the model, also adapters that do not wrap this layer,
    so this layer's adapters are read from its own containers only, and its checkpoint keys leave
    the shared ones out (the tuner saves them once). Deleting an adapter here leaves the shared
    entry to the tuner.
    """

    #: Attributes (listed in `adapter_layer_names` or `other_param_names` too) holding the tuner's containers.
    shared_layer_names: ClassVar[tuple[str, ...]] = ()
    #: Containers whose keys are this layer's adapters (default: the unshared `adapter_layer_names`).
    presence_names: ClassVar[tuple[str, ...]] = ()

    def _own_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name for name in names if name not in self.shared_layer_names)

    def adapter_names(self) -> list[str]:
        """The adapters wrapping this layer: the keys of its own containers (`presence_names`)."""
        names: dict[str, None] = {}
        for attr in self.presence_names or self._own_names(self.adapter_layer_names):
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    def _all_available_adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self._own_names(self.adapter_layer_names + self.other_param_names):
            container = getattr(self, attr, None)
            if hasattr(container, "keys"):
                names.update(dict.fromkeys(container.keys()))
        return list(names)

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """This layer's checkpoint keys: those of its own tensors (the shared ones are the tuner's)."""
        shared = {f"{prefix}.{attr}" for attr in self.shared_layer_names}
        return {key: tensor for key, tensor in super().adapter_state(adapter_name, prefix).items() if key not in shared}

    def adapter_params(self, adapter_names: Optional[Any] = None) -> Iterator[nn.Parameter]:
        """The trainable tensors of the given adapters held here, the shared ones of this layer's adapters included."""
        own = set(self.adapter_names())
        wanted = own if adapter_names is None else own & set(adapter_names)
        yield from super().adapter_params(wanted)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop `adapter_name`'s tensors held here; its shared entries are the tuner's to drop."""
        self.adapter_layer_names = self._own_names(type(self).adapter_layer_names)
        self.other_param_names = self._own_names(type(self).other_param_names)
        try:
            super().delete_adapter(adapter_name)
        finally:
            del self.adapter_layer_names, self.other_param_names

    def share(self, attr: str, container: nn.Module) -> None:
        """Register the tuner's `container` under `attr` (the same object in every layer)."""
        if getattr(self, attr, None) is not container:
            setattr(self, attr, container)


# ---------------------------------------------------------------------------------------------- tuners
class SharedTensorsTuner(BiasOptions, BaseTuner):
    """A tuner owning per-adapter containers its layers share (`shared_containers`), saved once each.

    Subclasses create the adapter's shared tensors in `_create_shared(adapter_name, config)`;
    that runs before the adapter is injected (and so never on the meta device) and is undone if
    injecting fails, together with every other trace of the adapter.
    """

    #: Tuner attributes holding shared per-adapter containers, and whether each is a BufferDict.
    shared_containers: ClassVar[dict[str, bool]] = {}

    def shared(self, attr: str) -> nn.Module:
        """The tuner's container `attr`, created empty on first use."""
        if attr not in self._modules:
            setattr(self, attr, BufferDict() if self.shared_containers[attr] else nn.ParameterDict())
        return self._modules[attr]

    def _create_shared(self, adapter_name: str, config: Any) -> None:
        """Hook: create `adapter_name`'s entries in the shared containers."""

    def _drop_shared(self, adapter_name: str) -> None:
        for attr in self.shared_containers:
            container = self._modules.get(attr)
            if container is not None and adapter_name in container:
                del container[adapter_name]

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        fresh = adapter_name not in self.peft_config
        if fresh:
            self._create_shared(adapter_name, config)
        try:
            super().add_adapter(adapter_name, config, **kwargs)
        except BaseException:
            if fresh:
                self._drop_shared(adapter_name)
            raise

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        super()._remove_adapter_from_layers(adapter_name)
        if adapter_name not in self.peft_config:  # deleted (or never added): its shared tensors go too
            self._drop_shared(adapter_name)

    # ------------------------------------------------------------------ checkpoints
    def saved_shared(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Checkpoint entries of the shared tensors: `base_model.<attribute>` -> tensor (default: every container)."""
        return {
            TUNER_KEY_PREFIX + attr: self._modules[attr][adapter_name]
            for attr in self.shared_containers
            if attr in self._modules and adapter_name in self._modules[attr]
        }

    def extra_adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {**self.saved_shared(adapter_name), **super().extra_adapter_state(adapter_name)}

    def state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Tuner-level keys are written as peft writes them, `base_model.<attribute>` (see the module docstring)."""
        return tuner_keys_as_peft(state, prefix)


def refuse_unsupported(display_name: str, supported: str) -> Any:
    """The last dispatcher of a method: any target its other dispatchers refused raises peft's TypeError."""

    def dispatch(target: nn.Module, adapter_name: str, **_: Any) -> None:
        raise UnsupportedLayerError(
            f"Target module {type(base_of(target)).__name__} is not supported by {display_name}. Currently, only the "
            f"following modules are supported: {supported}. Narrow target_modules or add it to exclude_modules."
        )

    dispatch.__name__ = dispatch.__qualname__ = "refuse_unsupported"
    return dispatch

