r"""RandLoRA's shared random bases, drawn from `projection_prng_key` exactly as peft draws them.

For the largest (out, in) among the targets, `max_dim` / `min_dim` = its larger / smaller side
and `n = ceil(min_dim / r)`:

    randlora_A: (r, 1, min_dim)        randlora_B: (max_dim, n, r)

Dense bases: Kaiming-uniform (a = sqrt 5) from a CPU generator seeded with the key, in bfloat16
(float16 where bfloat16 is unavailable, as accelerate reports it), A first, then B as n draws of
(max_dim, 1, r); each divided by its standard deviation. Sparse bases: uniform draws u, then
-1 where u < 1/(2s), +1 where u > 1 - 1/(2s), else 0 (s = 3, or sqrt(min_dim) for `very_sparse`),
divided by the standard deviation; float32.
"""

from __future__ import annotations

import math

import torch


def num_bases(min_dim: int, r: int) -> int:
    """ceil(min_dim / r): enough rank-r bases for a full-rank update."""
    return -(-min_dim // r)


def _half_dtype() -> torch.dtype:
    from accelerate.utils import is_bf16_available

    return torch.bfloat16 if is_bf16_available() else torch.float16


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=_half_dtype())
    with torch.no_grad():
        return torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def dense_bases(r: int, max_dim: int, min_dim: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(key)
    basis_a = _kaiming((r, 1, min_dim), generator)
    basis_b = torch.cat([_kaiming((max_dim, 1, r), generator) for _ in range(num_bases(min_dim, r))], dim=1)
    return basis_a / basis_a.std(), basis_b / basis_b.std()


def sparse_bases(r: int, max_dim: int, min_dim: int, key: int, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(key)
    uniform_a = torch.rand((r, 1, min_dim), generator=generator)
    uniform_b = torch.rand((max_dim, num_bases(min_dim, r), r), generator=generator)

    def ternary(uniform: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(uniform.shape)
        out[uniform < 1 / (2 * sparsity)] = -1
        out[uniform > 1 - 1 / (2 * sparsity)] = 1
        return out / out.std()

    return ternary(uniform_a), ternary(uniform_b)


def make_bases(config, max_dim: int, min_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(randlora_A, randlora_B) for `config` (a RandLoraConfig) and the largest target's sides."""
    if config.very_sparse:
        return sparse_bases(config.r, max_dim, min_dim, config.projection_prng_key, math.sqrt(min_dim))
    if config.sparse:
        return sparse_bases(config.r, max_dim, min_dim, config.projection_prng_key, 3)
    return dense_bases(config.r, max_dim, min_dim, config.projection_prng_key)
