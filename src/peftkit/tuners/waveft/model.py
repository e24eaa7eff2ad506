"""`WaveFTModel`: the WaveFT tuner -- wraps targeted `nn.Linear` / `Conv1D` modules.

Checkpoints (as peft writes them) hold one tensor per wrapped module, `<module>.waveft_spectrum`
(n_frequency,); the coefficient positions are not saved but drawn again from `random_loc_seed`.

With `proportional_parameters`, the budget `n_frequency * T` (T targets) is shared in proportion
to each target's `in * out`: `n_i = max(1, round(in_i * out_i / sum_j in_j * out_j * budget))`
(Python's round, as peft), computed once per adapter over every module the config selects.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from .._core.base_layers import base_of
from .._core.matching import is_targeted, pattern_value
from ..fourierft.model import SpectralTuner
from ..vblora.shared import refuse_unsupported
from .config import WaveFTConfig
from .constants import WAVEFT_TARGET_MODULES_BY_MODEL_TYPE
from .layer import SUPPORTED_LAYERS, WaveFTLayer, dispatch_linear


class WaveFTModel(SpectralTuner):
    """Creates WaveFT adapters on a model: `WaveFTModel(model, WaveFTConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "waveft_"
    default_target_modules = WAVEFT_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = WaveFTLayer
    dispatchers = (dispatch_linear, refuse_unsupported("WaveFT", SUPPORTED_LAYERS))
    display_name = "WaveFT"
    supported_layers = SUPPORTED_LAYERS

    def _calculate_proportional_parameters(self, model: nn.Module, config: WaveFTConfig) -> dict[str, int]:
        """Module path -> n_frequency for every Linear / Conv1D `config` selects (peft's name and rule)."""
        sizes = {}
        for name, module in model.named_modules():
            base = base_of(module)
            if name and isinstance(base, (nn.Linear, Conv1D)) and is_targeted(config, name):
                sizes[name] = base.weight.shape[0] * base.weight.shape[1]
        if not sizes:
            raise ConfigError("No target modules found for proportional parameter allocation.")
        total, budget = sum(sizes.values()), config.n_frequency * len(sizes)
        return {name: max(1, round(size / total * budget)) for name, size in sizes.items()}

    def _n_frequency(self, config: WaveFTConfig, adapter_name: str, key: str) -> int:
        if config.proportional_parameters:
            cache: dict[str, dict[str, int]] = self.__dict__.setdefault("_proportional_params_cache", {})
            if adapter_name not in cache:
                cache[adapter_name] = self._calculate_proportional_parameters(self.model, config)
            found = cache[adapter_name].get(key)
            if found is not None:
                return found
        return pattern_value(config.n_frequency_pattern, key, config.n_frequency, "n_frequency_pattern")

    def layer_kwargs(self, config: WaveFTConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "n_frequency": self._n_frequency(config, adapter_name, key),
            "scaling": config.scaling,
            "wavelet_family": config.wavelet_family,
            "use_idwt": config.use_idwt,
            "random_loc_seed": config.random_loc_seed,
            "init_weights": config.init_weights,
        }

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        """Also drop the adapter's proportional allocation (delete_adapter, or a failed add_adapter)."""
        super()._remove_adapter_from_layers(adapter_name)
        self.__dict__.get("_proportional_params_cache", {}).pop(adapter_name, None)
