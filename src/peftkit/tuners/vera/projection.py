r"""What VeRA and PVeRA share: one frozen random pair (A, B) for the whole model, trained scaling vectors.

    A: (k r) x in_max     B: out_max x r          frozen, drawn once from `projection_prng_key`
    per layer (in, out):  lambda_d: (k r,)  lambda_b: (out,)   trained

    h = lambda_d * (dropout(x) A[:k r, :in]^T)          (k r,) per row
    z = latent(h)                                          VeRA (k = 1): z = h
                                                           PVeRA (k = 2): h = [mu, logvar], z = mu (+ noise)
    y = W x + lambda_b * (z B[:out, :r]^T)

A and B are sized for the largest targeted layer and sliced per layer. They are drawn with a CPU
`torch.Generator` seeded with `projection_prng_key`, A first, Kaiming-uniform (bound
`sqrt(6 / fan_in)`, fan_in = the second dimension), so a checkpoint saved without them
(`save_projection=False`) is rebuilt bit for bit, in peftkit and in peft alike.

The tuner owns the pair (`tuner.vera_A[adapter]`, a non-trainable `BufferDict`; every layer
registers the same container). The first adapter draws it; later adapters use the *same tensors*
under their own name (peft's rule), so every adapter must fit in the first one's shapes and share
its PRNG key and its `save_projection`. Checkpoints hold it once, as `base_model.vera_A` /
`base_model.vera_B` (see `vblora.shared`), when `save_projection` is set.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError, TargetModulesError
from .._core.base_layers import correct_fan_in_fan_out, is_linear_like, is_transposed, linear_features
from .._core.matching import is_targeted
from ..vblora.shared import BufferDict, SharedTensorsLayer, SharedTensorsTuner


def draw_projections(rows: int, r: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: rows x in, B: out x r), Kaiming-uniform from one CPU generator seeded with `seed`, A first."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    projection_a = nn.init.kaiming_uniform_(torch.empty(rows, in_features), generator=generator)
    projection_b = nn.init.kaiming_uniform_(torch.empty(out_features, r), generator=generator)
    return projection_a, projection_b


# ---------------------------------------------------------------------------------------------- layers
class ProjectionLayer(SharedTensorsLayer, nn.Module):
    """A frozen Linear / Conv1D / quantized linear plus, per adapter, lambda_b and lambda_d over the shared pair.

    Subclasses name their attributes (`projection_names`, `lambda_names`, `dropout_name`) and say
    how many rows of A each unit of rank takes (`rows_per_rank`).
    """

    #: (A, B): the tuner's shared containers.
    projection_names: ClassVar[tuple[str, str]] = ("vera_A", "vera_B")
    #: (lambda_b, lambda_d).
    lambda_names: ClassVar[tuple[str, str]] = ("vera_lambda_b", "vera_lambda_d")
    dropout_name: ClassVar[str] = "vera_dropout"
    rows_per_rank: ClassVar[int] = 1
    method_name: ClassVar[str] = "VeRA"

    def __init__(self, base_layer: nn.Module, adapter_name: str, **adapter_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_features(base)
        self.fan_in_fan_out = is_transposed(base)
        self.is_target_conv_1d_layer = isinstance(base, Conv1D)
        self.r: dict[str, int] = {}
        setattr(self, self.dropout_name, nn.ModuleDict({}))
        for name in self.lambda_names:
            setattr(self, name, nn.ParameterDict({}))
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **adapter_kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        projection_a: BufferDict,
        projection_b: BufferDict,
        r: int,
        dropout: float = 0.0,
        init_weights: bool = True,
        d_initial: float = 0.1,
        **method_kwargs: Any,
    ) -> None:
        """Add (or replace) `adapter_name`: lambda_b = 1, lambda_d ~ N(0, 1); with init_weights, 0 and d_initial.

        `method_kwargs` go to `_add_method_state` (PVeRA's sampling settings).
        """
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        self._check_fits(projection_a[adapter_name], projection_b[adapter_name], r)
        self.r[adapter_name] = r
        self._add_method_state(adapter_name, **method_kwargs)
        getattr(self, self.dropout_name)[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        name_b, name_d = self.lambda_names
        # Drawn as peft draws them (lambda_d from the global RNG even when init_weights resets it).
        getattr(self, name_b)[adapter_name] = nn.Parameter(torch.ones(self.out_features))
        getattr(self, name_d)[adapter_name] = nn.Parameter(torch.randn(self.rows_per_rank * r))
        for name, container in zip(self.projection_names, (projection_a, projection_b)):
            self.share(name, container)
        if init_weights:
            self._reset_lambdas(adapter_name, d_initial)
        self._move_adapter_to_base(adapter_name)
        self._place_projections(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _add_method_state(self, adapter_name: str, **method_kwargs: Any) -> None:
        """Hook: per-adapter settings beyond VeRA's (none here)."""
        if method_kwargs:
            raise TypeError(f"{type(self).__name__}.update_layer got unexpected arguments {sorted(method_kwargs)}.")

    def _check_fits(self, projection_a: torch.Tensor, projection_b: torch.Tensor, r: int) -> None:
        """peft's checks (and messages) that this layer fits in the shared pair; raised before anything changes."""
        first = (
            "{} has a size of {} but {} or greater is required; this probably happened because an additional "
            f"{self.method_name} adapter was added after the first one with incompatible shapes."
        )
        rank = (
            "{} has a size of {} but {} or greater is required; this probably happened because an additional "
            f"{self.method_name} adapter with a lower rank was added after the first one; loading the adapters "
            "in reverse order may solve this."
        )
        name_a, name_b = self.projection_names
        checks = (
            (projection_a.shape[1], self.in_features, first, name_a),
            (projection_b.shape[0], self.out_features, first, name_b),
            (projection_a.shape[0], self.rows_per_rank * r, rank, name_a),
            (projection_b.shape[1], r, rank, name_b),
        )
        for have, need, template, name in checks:
            if have < need:
                raise ConfigError(template.format(name, have, need))

    def _reset_lambdas(self, adapter_name: str, d_initial: float) -> None:
        name_b, name_d = self.lambda_names
        if adapter_name in getattr(self, name_d):
            with torch.no_grad():
                getattr(self, name_d)[adapter_name].fill_(d_initial)
                getattr(self, name_b)[adapter_name].zero_()

    def _place_projections(self, adapter_name: str) -> None:
        """The shared pair on the base's device; it stays float32 (as peft's default, autocast_adapter_dtype)."""
        weight = getattr(self.get_base_layer(), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.is_meta:
            return
        for name in self.projection_names:
            container = getattr(self, name)
            if container[adapter_name].device != weight.device:
                container[adapter_name] = container[adapter_name].to(weight.device)

    # ------------------------------------------------------------------ the update
    def _factors(self, adapter_name: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(A sliced to (k r, in), B sliced to (out, r), lambda_b, lambda_d) in `dtype` on `device`."""
        r = self.r[adapter_name]
        name_a, name_b = self.projection_names
        projection_a = getattr(self, name_a)[adapter_name][: self.rows_per_rank * r, : self.in_features]
        projection_b = getattr(self, name_b)[adapter_name][: self.out_features, :r]
        lambda_b, lambda_d = (getattr(self, name)[adapter_name] for name in self.lambda_names)
        return tuple(t.to(device=device, dtype=dtype) for t in (projection_a, projection_b, lambda_b, lambda_d))

    def latent(self, hidden: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """z from h = lambda_d * (x A^T): the identity for VeRA."""
        return hidden

    def mean_rows(self, projection_a: torch.Tensor, lambda_d: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of A and lambda_d that a merged (deterministic) update uses: all of them for VeRA."""
        return projection_a, lambda_d

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = (lambda_b B) (lambda_d A), laid out like the base weight (transposed for Conv1D)."""
        lambda_d = getattr(self, self.lambda_names[1])[adapter_name]
        dtype = lambda_d.dtype
        if lambda_d.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # slow half matmuls on CPU; cast back below
        projection_a, projection_b, lambda_b, lambda_d = self._factors(adapter_name, dtype, lambda_d.device)
        projection_a, lambda_d = self.mean_rows(projection_a, lambda_d, self.r[adapter_name])
        delta = (lambda_b.unsqueeze(-1) * projection_b) @ (lambda_d.unsqueeze(-1) * projection_a)
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(getattr(self, self.lambda_names[1])[adapter_name].dtype)

    def delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """lambda_b * (latent(lambda_d * (dropout(x) A^T)) B^T): two thin matmuls, no (out, in) matrix."""
        lambda_d = getattr(self, self.lambda_names[1])[adapter_name]
        projection_a, projection_b, lambda_b, lambda_d = self._factors(adapter_name, lambda_d.dtype, x.device)
        inputs = getattr(self, self.dropout_name)[adapter_name](x.to(lambda_d.dtype))
        hidden = self.latent(F.linear(inputs, projection_a) * lambda_d, adapter_name)
        return F.linear(hidden, projection_b) * lambda_b


# ---------------------------------------------------------------------------------------------- tuners
class ProjectionTuner(SharedTensorsTuner):
    """Owns the shared pair (A, B) of a VeRA-like method; see the module docstring.

    Subclasses set `layer_cls` (a `ProjectionLayer`), `shared_containers` (A and B, BufferDicts),
    `display_name`, `supported_layers` and `dropout_field`.
    """

    dropout_field: ClassVar[str] = "vera_dropout"
    #: How the save_projection error shows the values it found (peft: VeRA a sorted list, PVeRA a set).
    save_projection_values_as_set: ClassVar[bool] = False
    uses_shared_state = True

    @property
    def projection_names(self) -> tuple[str, str]:
        return self.layer_cls.projection_names

    def _projection_label(self) -> str:
        return " and ".join(self.projection_names)

    # ------------------------------------------------------------------ the shared pair
    def _find_dim(self, config: Any) -> tuple[int, int]:
        """(out, in): the largest out and in features over the Linear-like modules `config` targets."""
        prepared = self._prepare_adapter_config(config)
        largest: Optional[tuple[int, int]] = None
        for key, module in self.model.named_modules():
            if not key or isinstance(module, self.layer_cls) or not is_linear_like(module) or not is_targeted(prepared, key):
                continue
            in_features, out_features = linear_features(module)
            largest = (out_features, in_features) if largest is None else (
                max(largest[0], out_features), max(largest[1], in_features)
            )
        if largest is None:
            raise TargetModulesError(
                f"No layers types compatible with {self.display_name} were found. Please check "
                "`peft_config.target_modules`."
            )
        return largest

    def _create_shared(self, adapter_name: str, config: Any) -> None:
        """The first adapter draws the pair; later ones use the same tensors under their own name (as peft)."""
        name_a, name_b = self.projection_names
        container_a, container_b = self.shared(name_a), self.shared(name_b)
        if len(container_a) and len(container_b):
            container_a[adapter_name] = next(iter(container_a.values()))
            container_b[adapter_name] = next(iter(container_b.values()))
            return
        out_features, in_features = self._find_dim(config)
        rows = self.layer_cls.rows_per_rank * config.r
        projection_a, projection_b = draw_projections(rows, config.r, in_features, out_features, config.projection_prng_key)
        container_a.persistent = container_b.persistent = config.save_projection
        container_a[adapter_name], container_b[adapter_name] = projection_a, projection_b

    def layer_kwargs(self, config: Any, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        name_a, name_b = self.projection_names
        return {
            "projection_a": self.shared(name_a),
            "projection_b": self.shared(name_b),
            "r": config.r,
            "dropout": getattr(config, self.dropout_field),
            "init_weights": config.init_weights,
            "d_initial": config.d_initial,
            **self._method_layer_kwargs(config),
        }

    def _method_layer_kwargs(self, config: Any) -> dict[str, Any]:
        """Hook: the layer's extra `update_layer` arguments (PVeRA's sampling settings)."""
        return {}

    def new_layer_kwargs(self, config: Any, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """As peft: the base decides the layout, with peft's warnings."""
        correct_fan_in_fan_out(config, target, is_linear=is_linear_like)
        return {}

    def _check_new_adapter_config(self, config: Any) -> None:
        """Every adapter shares the pair: same PRNG key, same `save_projection` (peft's errors)."""
        super()._check_new_adapter_config(config)
        for existing in self.peft_config.values():
            if existing is not config and existing.projection_prng_key != config.projection_prng_key:
                raise ConfigError(
                    f"{self.display_name} PRNG initialisation key must be the same for all adapters. Got "
                    f"config.projection_prng_key={config.projection_prng_key!r} but previous config had "
                    f"{existing.projection_prng_key}."
                )
        values = {other.save_projection for other in self.peft_config.values()} | {config.save_projection}
        if len(values) > 1:
            raise ConfigError(
                f"{self.display_name} projection weights must be saved for all adapters or none, but got multiple "
                f"different values: {values if self.save_projection_values_as_set else sorted(values)}"
            )

    # ------------------------------------------------------------------ checkpoints
    def saved_shared(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The pair is in checkpoints exactly when the adapter's config says `save_projection`."""
        if not self.peft_config[adapter_name].save_projection:
            return {}
        return super().saved_shared(adapter_name)

    def state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        config = self.peft_config[adapter_name]
        container = self._modules.get(self.projection_names[0])
        if config.save_projection and container is not None and not container.persistent:
            name_a, name_b = self.projection_names
            raise ConfigError(
                f"Model was initialised to not save {name_a} and {name_b} but config now specifies to save "
                "projection! Set `config.save_projection` to `False`."
            )
        return super().state_for_save(adapter_name, state, prefix)

    def _projection_keys(self, prefix: str) -> list[str]:
        return [prefix + "base_model." + name for name in self.projection_names]

    def checkpoint_for_load(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """peft's rules: projections required with save_projection, else ignored (with peft's warnings)."""
        name_a, name_b = self.projection_names
        present = self._projection_keys(prefix)[0] in state
        if self.peft_config[adapter_name].save_projection:
            if not present:
                raise ConfigError(
                    f"Specified to load {name_a} and {name_b} from state dictionary however they were not present!"
                )
        elif present:
            warnings.warn(
                f"Specified to not load {name_a} and {name_b} from state dictionary however they are present in state"
                " dictionary! Consider using them to ensure checkpoint loading is correct on all platforms using"
                " `peft_config.save_projection = True`",
                stacklevel=4,
            )
        else:
            warnings.warn(
                f"Specified to not load {name_a} and {name_b} from state dictionary. This means we will be relying on"
                " PRNG initialisation to restore these projections using `config.projection_prng_key`, which may"
                " not be accurate on all system configurations.",
                stacklevel=4,
            )
        return super().checkpoint_for_load(adapter_name, state, prefix)

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        """Projections in a checkpoint of a `save_projection=False` adapter are ignored, as peft ignores them."""
        if self.peft_config[adapter_name].save_projection:
            return ()
        return tuple(rf"(.*\.)?base_model\.{name}$" for name in self.projection_names)
