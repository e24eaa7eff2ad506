"""`FourierFTModel`: the FourierFT tuner -- wraps targeted `nn.Linear` / `Conv1D` modules.

Checkpoints (as peft writes them) hold one tensor per wrapped module, `<module>.fourierft_spectrum`
(n_frequency,); the frequency locations are not saved but drawn again from `random_loc_seed`.
With `bias="all"` / `"fourier_only"` the trained biases are saved under their module paths too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from .._core.base_layers import correct_fan_in_fan_out
from ..vblora.shared import SharedTensorsTuner, refuse_unsupported
from .config import FourierFTConfig
from .constants import FOURIERFT_TARGET_MODULES_BY_MODEL_TYPE
from .layer import SUPPORTED_LAYERS, FourierFTLayer, dispatch_linear


def fourierft_pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """peft's FourierFT rule: the first pattern matching `.*\\.<pattern>$` of the module path, else the
    entry named exactly by the path, else `default`."""
    for pattern in patterns:
        if re.match(rf".*\.{pattern}$", key):
            return patterns[pattern]
    return patterns.get(key, default)


class SpectralTuner(SharedTensorsTuner):
    """What the FourierFT and WaveFT tuners share: no shared tensors, peft's bias options and
    fan_in_fan_out correction, and the unsupported-layer TypeError."""

    shared_containers: dict[str, bool] = {}

    def new_layer_kwargs(self, config: Any, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        correct_fan_in_fan_out(config, target)
        return {}


class FourierFTModel(SpectralTuner):
    """Creates FourierFT adapters on a model: `FourierFTModel(model, FourierFTConfig(...), "default")`.

    Usually built through `get_peft_model`; `model.base_model` of a `PeftModel` is this object.
    """

    prefix = "fourierft_"
    default_target_modules = FOURIERFT_TARGET_MODULES_BY_MODEL_TYPE
    layer_cls = FourierFTLayer
    dispatchers = (dispatch_linear, refuse_unsupported("FourierFT", SUPPORTED_LAYERS))
    display_name = "FourierFT"
    supported_layers = SUPPORTED_LAYERS

    def layer_kwargs(self, config: FourierFTConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "n_frequency": fourierft_pattern_value(config.n_frequency_pattern, key, config.n_frequency),
            "scaling": config.scaling,
            "random_loc_seed": config.random_loc_seed,
            "init_weights": config.init_weights,
        }
