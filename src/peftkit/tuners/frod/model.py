r"""`FrodModel`: the FRoD tuner -- computes the shared bases V, then wraps targeted Linear / Conv1D modules.

Categories. Targeted modules that play the same role in every block share V: the category is read
from the end of the module path (`model.layers.3.self_attn.q_proj` -> `self_attn_q_proj`,
`encoder.layer.0.attention.output.dense` -> `attention_output`, `lin0` -> `lin0`).

Basis of a category, from the weights W_1..W_n (out_i x in) of its modules, in block order:

    A = [W_1; ...; W_n]                       (sum out_i) x in
    rows < in:  V = right singular vectors of A (full)
    else:       A = Q R;  T = mean_i (Q_i^T Q_i + alpha I)^-1;  V = R^T eigvecs(T)

S's pattern: per category (sorted by name), `max(1, int(in^2 * sparse_rate))` distinct
off-diagonal positions drawn with `randperm` from one CPU generator seeded with
`projection_prng_key` (0 positions when sparse_rate is 0), as peft draws them.

Checkpoints (as peft writes them):

    <module>.frod_lambda_l (in,)    <module>.frod_lambda_s_values (nnz,)
    base_model.frod_V.<category> (in, in)   base_model.frod_s_indices.<category> (2, nnz)
    base_model.frod_s_size.<category> (2,)          the last three only with save_projection=True
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError, TargetModulesError
from .._core.base_layers import correct_fan_in_fan_out
from .._core.bias import BiasOptions
from .._core.buffer_dict import BufferDict
from .._core.matching import is_targeted
from .._core.tuner import BaseTuner
from .._core.tuner_keys import TUNER_KEY_PREFIX, tuner_keys_as_peft
from ..vblora.shared import refuse_unsupported
from ..vera.model import VERA_TARGET_MODULES_BY_MODEL_TYPE
from .config import FrodConfig
from .layer import SUPPORTED_LAYERS, FrodLayer, dispatch_linear

#: peft's table: VeRA's defaults, with ViT's query/value.
FROD_TARGET_MODULES_BY_MODEL_TYPE: dict[str, Any] = {**VERA_TARGET_MODULES_BY_MODEL_TYPE, "vit": ["query", "value"]}
#: The tuner's per-category containers, and their checkpoint-key prefix (peft's `PeftModel.base_model.<name>`).
PROJECTION_NAMES = ("frod_V", "frod_s_indices", "frod_s_size")


def category_from_key(key: str) -> str:
    """The basis-sharing role of the module at `key` (see the module docstring)."""
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def layer_index_from_key(key: str, fallback: int) -> int:
    """The block index of `key`: the number after `layers`, else the first number in the path, else `fallback`."""
    parts = key.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    return next((int(part) for part in parts if part.isdigit()), fallback)


def shared_basis(matrices: list[torch.Tensor], regularization_alpha: float) -> torch.Tensor:
    """V (in x in) of one category from its float32 weights (out_i x in), see the module docstring."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        _, _, vh = torch.linalg.svd(stacked, full_matrices=True)
        return vh.T
    q_matrix, r_matrix = torch.linalg.qr(stacked)
    dim = r_matrix.shape[1]
    identity = torch.eye(dim, dtype=r_matrix.dtype)
    mean_inverse = torch.zeros((dim, dim), dtype=r_matrix.dtype)
    start = 0
    for matrix in matrices:
        q_slice = q_matrix[start : start + matrix.shape[0], :]
        start += matrix.shape[0]
        # Blocks of one category can be highly correlated; the ridge term keeps the inverse stable.
        mean_inverse += torch.linalg.inv(q_slice.T @ q_slice + regularization_alpha * identity)
    mean_inverse /= len(matrices)
    _, eigenvectors = torch.linalg.eigh(mean_inverse)
    return r_matrix.T @ eigenvectors


def sparse_pattern(dim: int, sparse_rate: float, generator: torch.Generator) -> torch.Tensor:
    """(2, nnz) distinct off-diagonal positions of a dim x dim matrix, drawn as peft draws them."""
    rows, cols = torch.meshgrid(torch.arange(dim), torch.arange(dim), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    off_diagonal = positions[positions[:, 0] != positions[:, 1]]
    nnz = min(int(dim * dim * sparse_rate), off_diagonal.shape[0])
    if sparse_rate > 0 and off_diagonal.shape[0] > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    chosen = torch.randperm(off_diagonal.shape[0], generator=generator)[:nnz]
    return off_diagonal[chosen].t().contiguous().to(torch.long)


class FrodModel(BiasOptions, BaseTuner):
    """Creates FRoD adapters on a model: `FrodModel(model, FrodConfig(...), "default")`.

    `frod_V[category][adapter]` is the shared basis of a category (`frod_s_indices`, `frod_s_size`:
    the pattern of S); every layer of the category reads the same containers.
    """

    prefix = "frod_"
    layer_cls = FrodLayer
    dispatchers = (dispatch_linear, refuse_unsupported("FRoD", SUPPORTED_LAYERS))
    default_target_modules = FROD_TARGET_MODULES_BY_MODEL_TYPE
    display_name = "FRoD"
    supported_layers = SUPPORTED_LAYERS
    uses_shared_state = True

    # ------------------------------------------------------------------ the shared containers
    def projections(self, name: str) -> nn.ModuleDict:
        """The tuner's `name` container (category -> BufferDict {adapter: tensor}), created empty on first use."""
        if name not in self._modules:
            setattr(self, name, nn.ModuleDict())
        return self._modules[name]

    @property
    def frod_V(self) -> nn.ModuleDict:
        return self.projections("frod_V")

    @property
    def frod_s_indices(self) -> nn.ModuleDict:
        return self.projections("frod_s_indices")

    @property
    def frod_s_size(self) -> nn.ModuleDict:
        return self.projections("frod_s_size")

    def _targeted_weights(self, config: FrodConfig, targets: Optional[set[str]]) -> dict[int, dict[str, torch.Tensor]]:
        """block index -> category -> (out, in) weight, over the Linear / Conv1D modules the adapter targets."""
        weights: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        inner = [name for name, module in self.model.named_modules() if isinstance(module, FrodLayer)]
        fallback = 0
        for key, module in self.model.named_modules():
            if not key or any(key.startswith(name + ".") for name in inner):
                continue
            if not (is_targeted(config, key) if targets is None else key in targets):
                continue
            base = module.get_base_layer() if isinstance(module, FrodLayer) else module
            if isinstance(base, nn.Linear):
                weight = base.weight
            elif isinstance(base, Conv1D):
                weight = base.weight.T
            else:
                continue
            weights[layer_index_from_key(key, fallback)][category_from_key(key)] = weight
            fallback += 1
        return weights

    def _init_frod_projections(self, config: FrodConfig, adapter_name: str, targets: Optional[set[str]] = None) -> None:
        """V and S's pattern of every category the adapter targets (peft's name)."""
        weights = self._targeted_weights(config, targets)
        if not weights:
            raise TargetModulesError(
                "No layer types compatible with FRoD were found. Please check `peft_config.target_modules`."
            )
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        categories = sorted({category for by_category in weights.values() for category in by_category})
        progress = tqdm(categories, disable=not config.progressbar, desc="FRoD hierarchical joint decomposition", unit="category")
        for category in progress:
            blocks = [by_category[category] for _, by_category in sorted(weights.items()) if category in by_category]
            dims = {block.shape[1] for block in blocks}
            if len(dims) > 1:
                raise ConfigError(
                    f"The FRoD modules of category {category!r} have different input sizes {sorted(dims)}; they share "
                    "one basis, so target modules of one size per category (or rename them)."
                )
            basis = shared_basis([block.detach().to("cpu", torch.float32) for block in blocks], config.regularization_alpha)
            pattern = sparse_pattern(basis.shape[0], config.sparse_rate, generator)
            values = (basis.to(blocks[0].dtype), pattern, torch.tensor([basis.shape[0]] * 2, dtype=torch.long))
            for name, value in zip(PROJECTION_NAMES, values):
                containers = self.projections(name)
                if category not in containers:
                    containers[category] = BufferDict(persistent=config.save_projection)
                containers[category][adapter_name] = value

    def _drop_projections(self, adapter_name: str) -> None:
        for name in PROJECTION_NAMES:
            containers = self._modules.get(name)
            if containers is None:
                continue
            for category in list(containers.keys()):
                if adapter_name in containers[category]:
                    del containers[category][adapter_name]
                if not len(containers[category]):
                    del containers[category]

    # ------------------------------------------------------------------ adding and removing adapters
    def _check_new_adapter_config(self, config: FrodConfig) -> None:
        """Every adapter shares the same PRNG key, `save_projection` and `runtime_offload_base_weight` (peft's errors)."""
        super()._check_new_adapter_config(config)
        for existing in self.peft_config.values():
            if existing is not config and existing.projection_prng_key != config.projection_prng_key:
                raise ConfigError(
                    "FRoD projection initialization key must be the same for all adapters. Got "
                    f"config.projection_prng_key={config.projection_prng_key!r} but previous config had "
                    f"{existing.projection_prng_key}."
                )
        configs = [*self.peft_config.values(), config]
        for name, what in (
            ("save_projection", "FRoD projection weights must be saved for all adapters or none"),
            ("runtime_offload_base_weight", "FRoD runtime base-weight offloading must be enabled for all adapters or none"),
        ):
            values = sorted({getattr(other, name) for other in configs})
            if len(values) > 1:
                raise ConfigError(f"{what}, but got multiple different values: {values}")

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        try:
            super().add_adapter(adapter_name, config, **kwargs)
        except BaseException:
            if adapter_name not in self.peft_config:
                self._drop_projections(adapter_name)
            raise

    def _inject(self, adapter_name: str, config: FrodConfig, targets: Optional[set[str]] = None) -> None:
        """As peft: the first adapter computes the projections of its categories before wrapping anything;
        a later adapter reuses the first adapter's tensors in the categories that exist already and
        computes (for all its categories) only when it reaches a new one (see `layer_kwargs`)."""
        if not len(self.frod_V):
            self._init_frod_projections(config, adapter_name, targets)
        super()._inject(adapter_name, config, targets)

    def _remove_adapter_from_layers(self, adapter_name: str) -> None:
        super()._remove_adapter_from_layers(adapter_name)
        if adapter_name not in self.peft_config:  # deleted (or never added): its projections go too
            self._drop_projections(adapter_name)

    def layer_kwargs(self, config: FrodConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        category = category_from_key(key)
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if not isinstance(base, (nn.Linear, Conv1D)):
            return {}  # no FRoD layer for it: the last dispatcher refuses it with peft's TypeError
        if category not in self.frod_V:
            self._init_frod_projections(config, adapter_name)
            if category not in self.frod_V:  # targeted through a state dict, not through the config
                self._init_frod_projections(config, adapter_name, {key})
        return {
            "frod_V": self.frod_V[category],
            "frod_s_indices": self.frod_s_indices[category],
            "frod_s_size": self.frod_s_size[category],
            "frod_dropout": config.frod_dropout,
            "init_weights": config.init_weights,
            "runtime_offload_base_weight": config.runtime_offload_base_weight,
        }

    def new_layer_kwargs(self, config: FrodConfig, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        """As peft: the base decides the layout, with peft's warnings (the adapter's config records it)."""
        correct_fan_in_fan_out(config, target)  # as peft: the base decides the layout
        return {}

    # ------------------------------------------------------------------ checkpoints
    def extra_adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        state = dict(super().extra_adapter_state(adapter_name))
        if self.peft_config[adapter_name].save_projection:
            for name in PROJECTION_NAMES:
                for category, container in self.projections(name).items():
                    if adapter_name in container:
                        state[f"{TUNER_KEY_PREFIX}{name}.{category}"] = container[adapter_name]
        return state

    def state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Tuner-level keys are written as peft writes them, `base_model.frod_V.<category>` (no model prefix)."""
        return tuner_keys_as_peft(state, prefix)

    def _has_projections(self, state: dict[str, torch.Tensor]) -> bool:
        markers = tuple(f"{TUNER_KEY_PREFIX}{name}." for name in PROJECTION_NAMES)
        return any(marker in key for key in state for marker in markers)

    def checkpoint_for_load(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """peft's rules: projections required with save_projection, else ignored with a warning."""
        present = self._has_projections(state)
        if self.peft_config[adapter_name].save_projection and not present:
            raise ConfigError(
                "Specified to load FRoD projection tensors from state dictionary however they were not present. "
                "If this checkpoint was saved with `save_projection=False`, set `peft_config.save_projection` "
                "to `False` before loading so the projections are regenerated from the base model weights. "
                "Otherwise, re-save the adapter with `save_projection=True` to include these tensors."
            )
        if not self.peft_config[adapter_name].save_projection and present:
            warnings.warn(
                "Specified to not load FRoD projection tensors from state dictionary however they are present. "
                "Consider using them to ensure checkpoint loading is correct by setting "
                "`peft_config.save_projection = True`.",
                stacklevel=4,
            )
        return super().checkpoint_for_load(adapter_name, state, prefix)

    def tolerated_checkpoint_keys(self, adapter_name: str) -> tuple[str, ...]:
        tolerated = super().tolerated_checkpoint_keys(adapter_name)
        if self.peft_config[adapter_name].save_projection:
            return tolerated
        return tolerated + tuple(rf"(.*\.)?base_model\.{name}\..*$" for name in PROJECTION_NAMES)
