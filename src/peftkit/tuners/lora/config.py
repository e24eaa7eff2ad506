"""`LoraConfig`: fields, defaults and validation of LoRA, as in Hugging Face peft."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.validation import (
    as_name_set,
    check_bool,
    check_dropout,
    check_layer_indices,
    check_layer_selection,
    check_optional_name_list,
    check_pattern_dict,
    check_positive_number,
    check_rank,
)
from ...utils.peft_types import PeftType
from .init import is_valid_base_weight_init
from .arrow import ArrowConfig
from .corda import CordaConfig
from .eva import EvaConfig
from .loftq import LoftQConfig, check_loftq_options
from .loraga import LoraGAConfig
from .bdlora import BdLoraConfig
from .kasa import KasaConfig
from .monteclora import MontecloraConfig
from .velora import VeloraConfig

__all__ = ["ArrowConfig", "CordaConfig", "EvaConfig", "LoftQConfig", "LoraConfig", "LoraGAConfig", "LoraRuntimeConfig"]

_INIT_CHOICES = (True, False, "gaussian", "orthogonal", "mica", "loftq", "eva")


@dataclass
class LoraRuntimeConfig:
    """Settings that hold for this process only: never written to, nor read from, adapter_config.json.

    Args:
        ephemeral_gpu_offload: peft's option to copy CPU-offloaded tensors to the GPU for heavy
            operations (DoRA's initial weight norm). peftkit computes on the tensors' own device,
            so the flag is kept for code written for peft and changes nothing.
    """

    ephemeral_gpu_offload: bool = False


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter: `y = W x + scaling * B A dropout(x)`.

    Args:
        r: Rank of the update (`A: r x in`, `B: out x r`).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        exclude_modules: Names or a regex of modules never to wrap.
        lora_alpha: Numerator of `scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA).
        lora_dropout: Dropout on the adapter input.
        fan_in_fan_out: True when the base stores its weight as (in, out), e.g. GPT-2 `Conv1D`.
        bias: "none", "all" (train every bias) or "lora_only" (the biases of wrapped layers).
        use_rslora: Rank-stabilised scaling `lora_alpha / sqrt(r)`.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero),
            False (random A and B; the adapter is not a no-op -- for tests), "orthogonal" (peft's:
            A and B from one random orthogonal matrix, B A != 0; Linear layers, even r), "mica" (MiCA:
            B from the r minor left singular vectors of W and frozen, A zero and trained), or "pissa" /
            "pissa_niter_<N>" / "olora", which take A and B from the base weight and MODIFY the base
            weight in place (W becomes W - scaling B A; see `init.py` and the README).
        use_dora: Weight-decomposed LoRA: a trained magnitude per output channel (see `dora.py`).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
        rank_pattern / alpha_pattern: Per-module rank / alpha, keyed by a regex of the module path.
        target_parameters: Bare parameters to adapt, "<module path>.<parameter>" (exact or dotted
            suffix), e.g. MoE expert stacks `["experts.gate_up_proj"]`; see `param_wrapper.py`.
            Usable alone (target_modules None or []) or with target_modules on other modules.
        velora_config / use_bdlora / monteclora_config / kasa_config: LoRA variants for Linear
            layers, one per adapter (a `VeloraConfig`, `BdLoraConfig`, `MontecloraConfig` or
            `KasaConfig`, or its dict): VeLoRA (compressed activations for A's gradient,
            `velora.py`), BD-LoRA (a block-diagonal A or B, `bdlora.py`), MonteCLoRA (variational
            noise on A while training, `monteclora.py`), KaSA (truncates W's r smallest singular
            components and learns a diagonal between A and B, `kasa.py`).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.LORA
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Bias training"})
    use_rslora: bool = field(default=False, metadata={"help": "scaling = alpha / sqrt(r)"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_lora_weights: Union[bool, str] = field(default=True, metadata={"help": "Initialisation"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module rank"})
    alpha_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module alpha"})
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Any] = None
    loftq_config: Union[dict, Any] = field(default_factory=dict)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    use_dora: bool = False
    velora_config: Optional[Union[VeloraConfig, dict]] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[Union[MontecloraConfig, dict]] = None
    layer_replication: Optional[list] = None
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[Union[BdLoraConfig, dict]] = None
    arrow_config: Optional[Union[ArrowConfig, dict]] = None
    kasa_config: Optional[Union[KasaConfig, dict]] = None
    ensure_weight_tying: bool = False
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig, metadata={"help": "Not saved"})

    # peft fields whose features peftkit does not implement yet: they must keep their defaults.
    unsupported_fields: ClassVar[dict[str, Any]] = {
        "megatron_config": None,
        "use_qalora": False,
        "layer_replication": None,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.LORA.value:
            raise ConfigError(f"LoraConfig has peft_type {self.peft_type!r}; it must be 'LORA'.")
        self.peft_type = PeftType.LORA
        # VeLoRA / BD-LoRA / MonteCLoRA / KaSA: dicts (adapter_config.json) become their sub-configs.
        for name, sub_config_cls in _SUB_CONFIGS.items():
            setattr(self, name, _sub_config(getattr(self, name), sub_config_cls, name))
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
        self.rank_pattern = check_pattern_dict(self.rank_pattern, "rank_pattern")
        self.alpha_pattern = check_pattern_dict(self.alpha_pattern, "alpha_pattern")
        for flag in ("fan_in_fan_out", "use_rslora", "use_dora", "inference_mode"):
            check_bool(getattr(self, flag), flag)
        check_layer_indices(self.layers_to_transform)
        check_rank(self.r, "r")
        check_positive_number(self.lora_alpha, "lora_alpha")
        check_dropout(self.lora_dropout, 'lora_dropout')
        for key, rank in self.rank_pattern.items():
            check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in self.alpha_pattern.items():
            check_positive_number(alpha, f"alpha_pattern[{key!r}]")
        _check_token_indices(self.trainable_token_indices)
        self._check_alora_tokens()
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if self.target_parameters is not None:
            self.target_parameters = check_optional_name_list(self.target_parameters, "target_parameters")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r} is not valid; use 'none', 'all' or 'lora_only'.")
        if self.init_lora_weights not in _INIT_CHOICES and not is_valid_base_weight_init(self.init_lora_weights):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False, 'gaussian', "
                "'orthogonal', 'mica', 'pissa', 'pissa_niter_<N>', 'olora', 'loftq', 'eva', 'lora_ga' or 'corda'."
            )
        self._check_init_configs()
        self._check_lora_bias()
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and is_valid_base_weight_init(self.init_lora_weights):
            warnings.warn(
                "With use_rslora and rank_pattern/alpha_pattern, a PiSSA/OLoRA/LoRA-GA/CorDA adapter cannot be converted to plain "
                "LoRA on save (path_initial_model_for_weight_conversion); drop one of them if you need that.",
                stacklevel=3,
            )
        check_layer_selection(self)

    def _check_alora_tokens(self) -> None:
        """aLoRA's invocation tokens: a non-empty list of token ids (stored as a list)."""
        tokens = self.alora_invocation_tokens
        if tokens is None:
            return
        if not isinstance(tokens, (list, tuple)) or not tokens or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise ConfigError(
                f"alora_invocation_tokens={tokens!r} is invalid; pass the token ids of the invocation string, "
                "e.g. tokenizer.encode('<|assistant|>', add_special_tokens=False)."
            )
        self.alora_invocation_tokens = list(tokens)
        if str(self.task_type) != "CAUSAL_LM":
            warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", stacklevel=4)

    def _check_lora_bias(self) -> None:
        """`lora_bias` (a trained bias on lora_B): a bool, with the plain inits only, and not with DoRA (peft's rules)."""
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"lora_bias={self.lora_bias!r} must be True or False.")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                f"init_lora_weights={self.init_lora_weights!r} instead."
            )
        if self.lora_bias and self.use_dora:
            raise ConfigError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")

    def _register_custom_module(self, mapping: dict[type, type]) -> None:
        """peft's experimental API: wrap modules of type `T` with `mapping[T]` (a LoRA layer class built as
        `cls(base_layer, adapter_name, **layer_kwargs)`). Not saved: register again after loading a config.

        Kept on `runtime_config` (run-time only, never saved), which copies of the config share."""
        registered = dict(self._custom_modules or {})
        registered.update(mapping)
        self.runtime_config.custom_modules = registered

    @property
    def _custom_modules(self) -> Optional[dict[type, type]]:
        """peft's attribute: the layer types registered with `_register_custom_module` (None: none)."""
        return getattr(self.runtime_config, "custom_modules", None)

    def _check_init_configs(self) -> None:
        """The sub-config of a data-driven init goes with its init_lora_weights, as in peft: `loftq_config`
        (a `LoftQConfig` or its dict; kept as the dict) with 'loftq', `eva_config` (an `EvaConfig`) with 'eva'."""
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ConfigError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
            if not isinstance(self.loftq_config, dict):
                self.loftq_config = dataclasses.asdict(self.loftq_config)
            check_loftq_options(self.loftq_config)
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                          stacklevel=4)
        elif self.init_lora_weights == "eva" and self.eva_config is None:
            warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.",
                          stacklevel=4)
            self.eva_config = EvaConfig()
        elif self.init_lora_weights != "eva" and self.eva_config is not None:
            warnings.warn("`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.",
                          stacklevel=4)
        elif self.init_lora_weights == "corda" and self.corda_config is None:
            warnings.warn("`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA "
                          "config.", stacklevel=4)
            self.corda_config = CordaConfig()
        elif self.init_lora_weights != "corda" and self.corda_config is not None:
            warnings.warn("`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.",
                          stacklevel=4)


def _check_token_indices(value: Any) -> None:
    """`trainable_token_indices`: None, a list of row indices (the input embedding), or {module: indices}."""
    if value is None:
        return
    groups = value.values() if isinstance(value, dict) else [value]
    names_ok = not isinstance(value, dict) or all(isinstance(name, str) for name in value)
    rows_ok = all(
        isinstance(rows, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in rows)
        for rows in groups
    )
    if not (names_ok and rows_ok):
        raise ConfigError(
            f"trainable_token_indices={value!r} is invalid; pass a list of token ids (rows of the input embedding) "
            "or a dict {module name: [token ids]}."
        )


#: The sub-config fields (saved as dicts, as peft saves them) and their classes.
_SUB_CONFIGS = {
    "velora_config": VeloraConfig,
    "use_bdlora": BdLoraConfig,
    "monteclora_config": MontecloraConfig,
    "kasa_config": KasaConfig,
    "arrow_config": ArrowConfig,
    "eva_config": EvaConfig,
    "lora_ga_config": LoraGAConfig,
    "corda_config": CordaConfig,
}


def _sub_config(value: Any, config_cls: type, name: str) -> Any:
    """None, an instance of `config_cls`, or a dict of its fields (as saved) turned into one; else TypeError.

    Unknown keys of a dict (e.g. written by a newer peft) are dropped, as peft drops non-init fields.
    """
    if value is None or isinstance(value, config_cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(config_cls) if f.init}
        return config_cls(**{key: item for key, item in value.items() if key in known})
    raise TypeError(f"`{config_cls.__name__}` must be a `{config_cls.__name__}`, a dict, or None (got {name}={value!r}).")
