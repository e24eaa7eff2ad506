"""`RandLoraModel`: the RandLoRA tuner -- one pair of random bases per model, sized for the largest target.

Checkpoints (as peft writes them): each layer's `randlora_lambda` / `randlora_gamma`; with
`save_projection` also the bases, once as `base_model.randlora_A` / `base_model.randlora_B` and once
more under every layer (`<module>.randlora_A` / `_B`). Without `save_projection` the bases are drawn
again from `projection_prng_key` on loading (`bases.py`: the same draws as peft's).

Every adapter of a model shares the bases drawn for the first one (peft's rule), which is why all
adapters must use the same `projection_prng_key` and `save_projection`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import ConfigError
from .._core.base_layers import is_linear_like, linear_features
from .._core.matching import is_targeted, key_matches
from ..vblora.constants import lora_table
from ..vblora.shared import BufferDict, SharedTensorsTuner, refuse_unsupported
from .bases import make_bases
from .config import RandLoraConfig
from .layer import RandLoraLayer, dispatch_linear

SUPPORTED_LAYERS = "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D` (and quantized linear layers)"


class RandLoraModel(SharedTensorsTuner):
    """Creates RandLoRA adapters on a model: `RandLoraModel(model, RandLoraConfig(...), "default")`.

    `randlora_A[adapter]` / `randlora_B[adapter]` are the shared bases (frozen buffers).
    """

    prefix = "randlora_"
    layer_cls = RandLoraLayer
    dispatchers = (dispatch_linear, refuse_unsupported("RandLora", SUPPORTED_LAYERS))
    default_target_modules = lora_table()
    display_name = "RandLora"
    supported_layers = SUPPORTED_LAYERS
    shared_containers = {"randlora_A": True, "randlora_B": True}

    @property
    def randlora_A(self) -> BufferDict:
        return self.shared("randlora_A")

    @property
    def randlora_B(self) -> BufferDict:
        return self.shared("randlora_B")

    def _find_dim(self, config: RandLoraConfig) -> tuple[int, int]:
        """The largest (out, in), side by side, over the linear layers `config` targets."""
        config = self._prepare_adapter_config(config)
        largest = None
        for key, module in self.model.named_modules():
            if not key or not is_linear_like(module) or key_matches(key, config.modules_to_save):
                continue
            if not is_targeted(config, key):
                continue
            in_features, out_features = linear_features(module)
            shape = (out_features, in_features)
            largest = shape if largest is None else tuple(max(a, b) for a, b in zip(largest, shape))
        if largest is None:
            raise ConfigError("No layers types compatible with RandLora were found. Please check `peft_config.target_modules`.")
        return largest

    def _create_shared(self, adapter_name: str, config: RandLoraConfig) -> None:
        """The first adapter draws the bases; later ones borrow them (each layer checks they are large enough)."""
        if len(self.randlora_A):
            return
        out_dim, in_dim = self._find_dim(config)
        self.randlora_A.persistent = self.randlora_B.persistent = config.save_projection
        basis_a, basis_b = make_bases(config, max(out_dim, in_dim), min(out_dim, in_dim))
        self.randlora_A[adapter_name] = basis_a
        self.randlora_B[adapter_name] = basis_b

    def saved_shared(self, adapter_name: str) -> dict:
        return super().saved_shared(adapter_name) if self.randlora_A.persistent else {}

    def _check_new_adapter_config(self, config: RandLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        for existing in self.peft_config.values():
            if existing is not config and existing.projection_prng_key != config.projection_prng_key:
                raise ConfigError(
                    f"RandLora PRNG initialisation key must be the same for all adapters. Got "
                    f"config.projection_prng_key={config.projection_prng_key!r} but previous config had "
                    f"{existing.projection_prng_key}."
                )
        values = sorted({cfg.save_projection for cfg in [*self.peft_config.values(), config]})
        if len(values) > 1:
            raise ConfigError(
                "RandLora projection weights must be saved for all adapters or none, but got multiple different "
                f"values: {values}"
            )

    def layer_kwargs(self, config: RandLoraConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {
            "randlora_A": self.randlora_A,
            "randlora_B": self.randlora_B,
            "r": config.r,
            "randlora_alpha": config.randlora_alpha,
            "randlora_dropout": config.randlora_dropout,
            "init_weights": config.init_weights,
        }
