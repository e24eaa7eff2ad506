"""Which LoRA variant a layer gets for VeLoRA / BD-LoRA / MonteCLoRA / KaSA / Arrow, and where it is refused.

`LoraModel.layer_kwargs` turns the config into one request per target, `("velora", VeloraConfig)`,
`("bdlora", (side, nblocks))`, `("monteclora", MontecloraConfig)` or `("kasa", KasaConfig)`, and
`LoraLayer.update_layer` builds the variant object here (`build_variant`), before it changes anything.
As in peft these variants adapt `nn.Linear` layers only, one variant per adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ...errors import ConfigError
from ...quantization.weights import is_quantized

if TYPE_CHECKING:
    from .layer import LoraLayer

#: The LoraConfig field of each request kind (peft names variant combinations by these fields).
FIELDS = {"velora": "velora_config", "bdlora": "use_bdlora", "monteclora": "monteclora_config", "kasa": "kasa_config",
          "arrow": "arrow_config"}
LABELS = {"velora": "VeLoRA", "bdlora": "BD-LoRA", "monteclora": "MonteCLoRA", "kasa": "KaSA", "arrow": "Arrow"}


def variant_request(config: Any, key: str) -> Optional[tuple[str, Any]]:
    """The request of `config` for module `key`, or None for none of the four variants."""
    from .bdlora import block_diagonal_side

    if config.velora_config is not None:
        return ("velora", config.velora_config)
    if config.use_bdlora:
        return ("bdlora", (block_diagonal_side(config.use_bdlora, key), config.use_bdlora.nblocks))
    if config.monteclora_config is not None:
        return ("monteclora", config.monteclora_config)
    if config.kasa_config is not None:
        return ("kasa", config.kasa_config)
    if config.arrow_config is not None:
        return ("arrow", config.arrow_config)
    return None


def check_combination(config: Any) -> None:
    """At most one variant per adapter (peft: "Invalid or unsupported variant combination")."""
    requested = [name for name in FIELDS.values() if getattr(config, name)]
    requested += [name for name in ("use_dora", "alora_invocation_tokens") if getattr(config, name)]
    if config.init_lora_weights == "mica":
        requested.append("mica")
    if len(requested) > 1 and set(requested) & set(FIELDS.values()):
        raise ConfigError(
            f"Invalid or unsupported variant combination: {tuple(sorted(requested))}; a LoRA adapter takes at most "
            "one of these variants."
        )


def build_variant(layer: "LoraLayer", request: tuple[str, Any], lora_bias: bool = False) -> Any:
    """A fresh variant object for `request` on `layer`, or a ConfigError naming why this layer cannot take it."""
    kind, settings = request
    base = layer.get_base_layer()
    label, field = LABELS[kind], FIELDS[kind]
    if not getattr(layer, "supports_extra_variants", False):
        if kind == "velora" and type(base).__name__ in ("Conv1d", "Conv2d", "Conv3d"):
            raise ConfigError("VeLoRA does not support adapting conv layers; exclude them via exclude_modules.")
        raise ConfigError(
            f"Invalid or unsupported variant combination: ({field!r},): {label} adapts Linear layers only, not "
            f"{type(layer).__name__} over {type(base).__name__}; exclude this module or drop `{field}`."
        )
    if kind == "arrow":  # routes between the layer's other adapters; any linear base (4-bit included, as peft)
        from .arrow import ArrowVariant

        return ArrowVariant(settings)
    if is_quantized(base):
        raise ConfigError(
            f"{type(base).__name__} does not support {label}: the variant needs a dense base weight; "
            f"set `{field}=None` or exclude the quantized modules."
        )
    if kind == "velora":
        from .velora import VeloraVariant

        return VeloraVariant(settings)
    if kind == "bdlora":
        from .bdlora import BdLoraVariant

        side, nblocks = settings
        if lora_bias and side == "B":
            raise ConfigError("BD-LoRA's block-diagonal B has no bias: use lora_bias=False with target_modules_bd_b.")
        return BdLoraVariant(side, nblocks)
    if kind == "monteclora":
        from .monteclora import MontecloraVariant

        return MontecloraVariant(settings)
    from .kasa import KasaVariant

    if getattr(layer, "fan_in_fan_out", False):
        raise ConfigError(
            "KaSA does not support `fan_in_fan_out=True` layers (e.g. Conv1D). Please target nn.Linear layers."
        )
    return KasaVariant(settings)


#: The per-adapter containers the variants add to a layer when they first need them.
CONTAINERS = ("lora_velora_embed", "lora_monteclora_sampler", "lora_diag")


def forget_variant_tensors(layer: "LoraLayer", adapter_name: str) -> None:
    """Drop `adapter_name` from the variant containers of `layer` (before the adapter is created again)."""
    for attr in CONTAINERS:
        container = layer._modules.get(attr)
        if container is not None and adapter_name in container:
            del container[adapter_name]
