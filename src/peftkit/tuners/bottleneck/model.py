"""`BottleneckModel`: the bottleneck-adapter tuner -- resolves presets and wraps the insertion points.

Several adapters may be active at once: a list (or `Stack(...)`) applies them one after another in
the given order, `Average(...)` adds the mean of their outputs:

    model.set_adapter(Stack("lang", "task"))      # h -> lang -> task
    model.set_adapter(Average("a", "b", "c"))     # h + mean_i(adapter_i(h))

Parallel adapters all read the sub-layer input, so stacking them is the same as summing them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from torch import nn

from ...errors import AdapterStateError, ConfigError, TargetModulesError
from .._core.matching import is_targeted
from .._core.tuner import BaseTuner
from .config import BottleneckConfig
from .layer import BottleneckLayer, dispatch_bottleneck, feature_sizes
from .presets import BLOCK_LAYOUTS, COARSE_NAMES, DEFAULT_COARSE_NAMES, BlockLayout, module_paths, parallel_input_for


class Stack(list):
    """Active adapters applied one after another: `Stack("a", "b")` computes h -> a -> b."""

    def __init__(self, *adapter_names: str) -> None:
        super().__init__(adapter_names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self))})"


class Average(Stack):
    """Active adapters applied to the same input, their outputs averaged: h + mean_i(adapter_i(h))."""


class BottleneckModel(BaseTuner):
    """Creates bottleneck adapters on a model: `BottleneckModel(model, BottleneckConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "adapter_"
    layer_cls = BottleneckLayer
    dispatchers = (dispatch_bottleneck,)
    display_name = "bottleneck"
    _composition = "stack"

    # ------------------------------------------------------------------ targets
    def _layout(self) -> Optional[BlockLayout]:
        return BLOCK_LAYOUTS.get(self._model_type())

    def _prepare_adapter_config(self, config: BottleneckConfig) -> BottleneckConfig:
        """Replace coarse names (and a missing target_modules) by the full paths of the preset's modules."""
        layout = self._layout()
        names = config.target_modules
        if names is None:
            if layout is None:
                raise ConfigError(
                    f"target_modules is not set and peftkit has no bottleneck preset for model type "
                    f"{self._model_type()!r} (known: {', '.join(sorted(BLOCK_LAYOUTS))}); pass target_modules=[...]."
                )
            names = set(DEFAULT_COARSE_NAMES[config.adapter_type])
        if layout is not None and isinstance(names, set) and names & set(COARSE_NAMES):
            wrapped = tuple(name for name, _ in self.adapter_modules())
            resolved = names - set(COARSE_NAMES)
            for coarse in sorted(names & set(COARSE_NAMES)):
                found = module_paths(self.model, layout, coarse, config.is_parallel, skip=wrapped)
                if not found:
                    raise TargetModulesError(
                        f"target_modules {coarse!r} selects nothing in this {self._model_type()} model "
                        f"(it has no such sub-layer); remove {coarse!r} from target_modules."
                    )
                resolved |= found
            names = resolved
        return super()._prepare_adapter_config(dataclasses.replace(config, target_modules=names))

    def _check_new_adapter_config(self, config: BottleneckConfig) -> None:
        """Refuse targets that contain, or sit inside, a module another adapter wraps already.

        Nesting would change the other adapter's checkpoint keys (`...self_attn.base_layer.o_proj...`);
        it happens when sequential adapters (on projections) and parallel ones (on blocks) are mixed.
        """
        wrapped = [name for name, _ in self.tuner_layers()]
        for key, _ in self.model.named_modules():
            if not key or not is_targeted(config, key):
                continue
            for other in wrapped:
                if other.startswith(key + ".") or key.startswith(other + ".base_layer."):
                    raise ConfigError(
                        f"A {config.adapter_type} adapter on {key!r} would nest with the adapter on {other!r}; "
                        "bottleneck adapters cannot nest, so use the same kind of adapter_type (sequential "
                        "houlsby/pfeiffer or parallel) as the adapters already there, or other target_modules."
                    )

    def layer_kwargs(self, config: BottleneckConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        features = target.out_features if isinstance(target, BottleneckLayer) else feature_sizes(target, key)[1]
        return {
            "bottleneck_size": config.bottleneck_size(features, key),
            "activation": config.activation,
            "dropout": config.adapter_dropout,
            "scaling": config.scaling,
            "parallel": config.is_parallel,
            "init_weights": config.init_weights,
        }

    def new_layer_kwargs(self, config: BottleneckConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"key": key, "parallel_input": parallel_input_for(self._layout(), key), "composition": self._composition}

    # ------------------------------------------------------------------ several active adapters
    @property
    def active_adapters(self) -> list[str]:
        names = super().active_adapters
        return Average(*names) if self._composition == "average" else names

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate one adapter, several in order (a list or `Stack`), or several averaged (`Average`)."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._composition = "average" if isinstance(adapter_name, Average) else "stack"
        for _, layer in self.tuner_layers():
            layer.composition = self._composition

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; the remaining active adapters keep being averaged if they were."""
        average = self._composition == "average"
        super().delete_adapter(adapter_name)
        if average and len(super().active_adapters) > 1:
            self.set_adapter(Average(*super().active_adapters))

    # ------------------------------------------------------------------ merging
    def _check_merge_allowed(self) -> None:
        raise AdapterStateError(
            "Bottleneck adapters cannot be merged into the base weights: their activation makes them "
            "nonlinear. Keep the PeftModel for inference, or call unload() to get the base model back."
        )

