"""`BottleneckConfig` (alias `AdapterConfig`): bottleneck adapters, configured by preset or module name.

Both spellings found in the wild work and may be mixed:

    AdapterConfig(adapter_type="pfeiffer", reduction_factor=16, non_linearity="relu", adapter_dropout=0.1)
    AdapterConfig(adapter_dim=64, hidden_act="gelu", adapter_dropout=0.1, target_modules=["attention", "mlp"])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_dropout, check_layer_selection, check_size

ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel")
#: Accepted activation names -> the canonical one (swish and silu are the same function).
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu", "tanh": "tanh"}
DEFAULT_REDUCTION_FACTOR = 16
DEFAULT_ACTIVATION = "relu"


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter `x -> x + scaling * up(act(down(dropout(x))))`.

    Args:
        adapter_type: "houlsby" (after the attention output and the feed-forward output),
            "pfeiffer" (after the feed-forward output only) or "parallel" (a scaled branch beside
            the attention and feed-forward sub-layers: `y = sublayer(x) + scaling * adapter(x)`).
        reduction_factor: Bottleneck size `b = d // reduction_factor`, d the wrapped module's
            output size. Default 16 when `adapter_dim` is not given either.
        adapter_dim: Bottleneck size b directly. If both are given, they must agree for every
            wrapped module.
        non_linearity / hidden_act: Activation between down- and up-projection: "relu", "gelu",
            "swish" (= "silu") or "tanh". Default "relu"; if both are given they must agree.
        adapter_dropout: Dropout on the adapter input.
        scaling: Factor on the adapter output, a number or "learned" (a trained scalar, init 1.0).
        init_weights: True: down-projection Kaiming-uniform, up-projection and biases zero, so a
            new adapter is the identity. False: random up-projection too (a non-trivial adapter
            for tests).
        target_modules: Module names (suffix match) or a regex over full paths, or the coarse
            names "attention", "cross_attention", "mlp", resolved per architecture (see
            presets.py). None: the preset of `adapter_type`.
        exclude_modules: Names or a regex of modules never to wrap.
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.BOTTLENECK
    adapter_type: str = field(default="houlsby", metadata={"help": "houlsby, pfeiffer or parallel"})
    reduction_factor: Optional[Union[int, float]] = field(default=None, metadata={"help": "b = d // factor"})
    adapter_dim: Optional[int] = field(default=None, metadata={"help": "Bottleneck size b"})
    non_linearity: Optional[str] = field(default=None, metadata={"help": "relu, gelu, swish/silu, tanh"})
    hidden_act: Optional[str] = field(default=None, metadata={"help": "Alias of non_linearity"})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input"})
    scaling: Union[float, str] = field(default=1.0, metadata={"help": "Output factor or 'learned'"})
    init_weights: bool = field(default=True, metadata={"help": "Zero up-projection: a new adapter is a no-op"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.BOTTLENECK.value:
            raise ConfigError(f"BottleneckConfig has peft_type {self.peft_type!r}; it must be 'BOTTLENECK'.")
        self.peft_type = PeftType.BOTTLENECK
        if not isinstance(self.adapter_type, str) or self.adapter_type.lower() not in ADAPTER_TYPES:
            raise ConfigError(f"adapter_type={self.adapter_type!r} is not valid; use one of {', '.join(ADAPTER_TYPES)}.")
        self.adapter_type = self.adapter_type.lower()
        self._check_sizes()
        _ = self.activation  # raises for an unknown or conflicting activation name
        check_dropout(self.adapter_dropout, "adapter_dropout")
        if not _is_number(self.scaling) and self.scaling != "learned":
            raise ConfigError(f"scaling={self.scaling!r} is not valid; use a number such as 1.0 or 'learned'.")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} is not valid; use True or False.")
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        check_layer_selection(self)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    def _check_sizes(self) -> None:
        factor, dim = self.reduction_factor, self.adapter_dim
        if factor is not None and not (_is_number(factor) and factor > 0):
            raise ConfigError(f"reduction_factor={factor!r} is invalid; use a number > 0 such as 16.")
        check_size(dim, "adapter_dim", example="64", allow_none=True)

    # ------------------------------------------------------------------ resolved settings
    @property
    def is_parallel(self) -> bool:
        return self.adapter_type == "parallel"

    @property
    def activation(self) -> str:
        """The canonical activation name ("relu", "gelu", "silu", "tanh") from either spelling."""
        names = {}
        for field_name in ("non_linearity", "hidden_act"):
            value = getattr(self, field_name)
            if value is None:
                continue
            canonical = ACTIVATIONS.get(str(value).lower())
            if canonical is None:
                raise ConfigError(f"{field_name}={value!r} is not supported; use one of {', '.join(ACTIVATIONS)}.")
            names[field_name] = canonical
        if len(set(names.values())) > 1:
            raise ConfigError(
                f"non_linearity={self.non_linearity!r} and hidden_act={self.hidden_act!r} disagree; "
                "they are two spellings of one setting, so set only one of them."
            )
        return next(iter(names.values()), DEFAULT_ACTIVATION)

    def bottleneck_size(self, features: int, module_name: str) -> int:
        """b for a wrapped module with `features` outputs: `adapter_dim`, or `features // reduction_factor`."""
        from_factor = None
        if self.reduction_factor is not None:
            from_factor = int(features // self.reduction_factor)
            if from_factor < 1:
                raise ConfigError(
                    f"reduction_factor={self.reduction_factor} leaves no bottleneck for {module_name!r} "
                    f"({features} features); use a smaller reduction_factor or set adapter_dim."
                )
        if self.adapter_dim is not None and from_factor is not None and from_factor != self.adapter_dim:
            raise ConfigError(
                f"adapter_dim={self.adapter_dim} and reduction_factor={self.reduction_factor} disagree for "
                f"{module_name!r}: {features} // {self.reduction_factor} = {from_factor}. Set only one of them."
            )
        if self.adapter_dim is not None:
            return self.adapter_dim
        return from_factor if from_factor is not None else max(1, features // DEFAULT_REDUCTION_FACTOR)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: The name AdapterHub-style code uses.
AdapterConfig = BottleneckConfig
