"""`PsoftConfig`: fields, defaults and validation of PSOFT (orthogonal fine-tuning in the principal subspace), as in peft."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import (
    as_name_set,
    check_bool,
    check_dropout,
    check_finite,
    check_layer_indices,
    check_optional_name_list,
    check_size_bound,
)

INITS = ("pissa_init", "psoft_init")
SVD_BACKENDS = ("full", "lowrank")
_DEFAULT_NITER = 10
_DEFAULT_NEUMANN_TERMS = 5


@dataclass
class PsoftConfig(PeftConfig):
    """Configuration of a PSOFT adapter: `delta_W = (alpha / r) B (R - I) A`, only R (and two scale vectors) trained.

    Args:
        r: Size of the principal subspace (A: r x in, B: out x r, R: r x r); at most min(in, out).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
        exclude_modules: Names or a regex of modules never to wrap.
        psoft_alpha: Numerator of `scaling = psoft_alpha / r`.
        psoft_dropout: Dropout on the adapter path's input.
        fan_in_fan_out: Only Linear layers are wrapped, so this is corrected to False (warned about).
        ab_svd_init: "psoft_init": A = V_r^T (orthonormal rows), B = U_r S_r / scaling;
            "pissa_init": A = sqrt(S_r / scaling) V_r^T, B = U_r sqrt(S_r / scaling).
        psoft_svd: "full" (`torch.linalg.svd`) or "lowrank" (`torch.svd_lowrank`, seeded by `random_seed`).
        psoft_svd_lowrank_niter: Power iterations of the low-rank SVD.
        random_seed: Seed of the low-rank SVD, so that loading rebuilds the same A and B.
        psoft_orth: True: R is the Cayley transform of a skew-symmetric matrix (orthogonal); False: R is free.
        psoft_mag_b / psoft_mag_a: Learn a scale vector on R's output / input side.
        use_cayley_neumann: Approximate the Cayley inverse by a Neumann series.
        num_cayley_neumann_terms: Terms of that series.
        cayley_neumann_eps: If set (in (0, 1)), Q is rescaled to this Frobenius norm when larger.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
        init_weights: True makes a new adapter a no-op (R = I); False perturbs R (for tests).
        layers_to_transform / layers_pattern: Restrict wrapping to these block indices.
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.PSOFT
    r: int = field(default=32, metadata={"help": "Size of the principal subspace"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    psoft_alpha: int = field(default=32, metadata={"help": "scaling = psoft_alpha / r"})
    psoft_dropout: float = field(default=0.0, metadata={"help": "Dropout of the adapter path"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored (in, out)"})
    ab_svd_init: Literal["psoft_init", "pissa_init"] = field(default="psoft_init", metadata={"help": "A/B init"})
    psoft_svd: Literal["full", "lowrank"] = field(default="full", metadata={"help": "SVD backend"})
    psoft_svd_lowrank_niter: int = field(default=_DEFAULT_NITER, metadata={"help": "Low-rank SVD iterations"})
    random_seed: int = field(default=0, metadata={"help": "Seed of the low-rank SVD"})
    psoft_orth: bool = field(default=True, metadata={"help": "Cayley-parameterised (orthogonal) R"})
    psoft_mag_b: bool = field(default=True, metadata={"help": "Scale vector on R's output side"})
    psoft_mag_a: bool = field(default=True, metadata={"help": "Scale vector on R's input side"})
    use_cayley_neumann: bool = field(default=False, metadata={"help": "Neumann-series Cayley transform"})
    num_cayley_neumann_terms: int = field(default=_DEFAULT_NEUMANN_TERMS, metadata={"help": "Neumann terms"})
    cayley_neumann_eps: Optional[float] = field(default=None, metadata={"help": "Bound on ||Q||_F"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})
    init_weights: bool = field(default=True, metadata={"help": "True: the new adapter is a no-op"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.PSOFT.value:
            raise ConfigError(f"PsoftConfig has peft_type {self.peft_type!r}; it must be 'PSOFT'.")
        self.peft_type = PeftType.PSOFT
        self.target_modules = as_name_set(self.target_modules)
        self.exclude_modules = as_name_set(self.exclude_modules, "exclude_modules")
        self._check_layer_selection()
        _check_int(self.r, "r", "`r` must be a positive integer; got {value}.", minimum=1)
        check_finite(self.psoft_alpha, "psoft_alpha")
        check_dropout(self.psoft_dropout, "psoft_dropout")
        for name in ("fan_in_fan_out", "psoft_orth", "psoft_mag_b", "psoft_mag_a", "use_cayley_neumann", "init_weights"):
            check_bool(getattr(self, name), name)
        if self.ab_svd_init not in INITS:
            raise ConfigError(f"`ab_svd_init` must be one of {sorted(INITS)}; got {self.ab_svd_init!r}.")
        if self.psoft_svd not in SVD_BACKENDS:
            raise ConfigError(f"`psoft_svd` must be one of {sorted(SVD_BACKENDS)}; got {self.psoft_svd!r}.")
        _check_int(self.psoft_svd_lowrank_niter, "psoft_svd_lowrank_niter", "psoft_svd_lowrank_niter={value!r} is invalid; "
                   "pass a non-negative integer such as 10.", minimum=0)
        _check_int(self.random_seed, "random_seed", "random_seed={value!r} is invalid; pass an integer such as 0.")
        self._check_cayley_fields()
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")

    def _check_layer_selection(self) -> None:
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        check_layer_indices(self.layers_to_transform)

    def _check_cayley_fields(self) -> None:
        if self.psoft_svd != "lowrank" and self.psoft_svd_lowrank_niter != _DEFAULT_NITER:
            warnings.warn(
                "`psoft_svd_lowrank_niter` is only used when `psoft_svd='lowrank'`. "
                f"Got psoft_svd={self.psoft_svd!r}, so psoft_svd_lowrank_niter="
                f"{self.psoft_svd_lowrank_niter} will be ignored.",
                UserWarning,
                stacklevel=3,
            )
        terms, eps = self.num_cayley_neumann_terms, self.cayley_neumann_eps
        if eps is not None:
            check_finite(eps, "cayley_neumann_eps")
        if self.use_cayley_neumann:
            _check_int(terms, "num_cayley_neumann_terms",
                       "`num_cayley_neumann_terms` must be a positive integer; got {value}.", minimum=1)
            if eps is not None and not 0.0 < eps < 1.0:
                raise ConfigError(f"`cayley_neumann_eps` must be in (0, 1) when set; got {eps}.")
            return
        _check_int(terms, "num_cayley_neumann_terms", "num_cayley_neumann_terms={value!r} is invalid; pass an integer.")
        if terms != _DEFAULT_NEUMANN_TERMS:
            warnings.warn(
                "`num_cayley_neumann_terms` is only used when `use_cayley_neumann=True`. "
                f"Since `use_cayley_neumann=False`, `num_cayley_neumann_terms={terms}` will be ignored.",
                UserWarning,
                stacklevel=4,
            )
        if eps is not None:
            warnings.warn(
                "`cayley_neumann_eps` is only used when `use_cayley_neumann=True`. "
                f"Since `use_cayley_neumann=False`, `cayley_neumann_eps={eps}` will be ignored.",
                UserWarning,
                stacklevel=4,
            )


def _check_int(value: object, name: str, message: str, minimum: Optional[int] = None) -> None:
    """An int (not a bool), at least `minimum` when given; `message` is formatted with the value."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ConfigError(message.format(value=value))
    check_size_bound(abs(value), name)
