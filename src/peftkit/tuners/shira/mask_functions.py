"""SHiRA's mask functions: which entries of W an adapter trains.

A mask function has the signature `mask_fn(base_layer, r, **kwargs) -> mask`, where `mask` is a
0/1 tensor shaped like the (out x in) weight with exactly `r * (out + in)` ones -- as many
trainable values as a rank-r LoRA has -- on the weight's device. `ShiraConfig(mask_type="random")`
uses `random_mask`; any other `mask_type` expects the user to set `config.mask_fn` afterwards.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .._core.base_layers import linear_features


def num_shira_values(in_features: int, out_features: int, r: int) -> int:
    """K = r * (in + out): the trained entries of an (out x in) weight (a rank-r LoRA's count)."""
    return r * (in_features + out_features)


def random_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None, **kwargs: Any) -> torch.Tensor:
    """A uniformly random sparse mask: K = r (out + in) of the out x in positions, drawn without replacement.

    The positions are the first K of a permutation drawn by a fresh CPU `torch.Generator` (seeded
    with `random_seed` when given, else at the generator's fixed default seed), so every layer of a
    given shape gets the same mask unless a seed differs -- peft 0.21.2 draws exactly these.
    """
    in_features, out_features = linear_features(base_layer)
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    count = num_shira_values(in_features, out_features, r)
    chosen = torch.randperm(in_features * out_features, generator=generator)[:count]
    mask = torch.zeros(out_features * in_features, dtype=torch.bool)
    mask[chosen] = True
    return mask.view(out_features, in_features).to(base_layer.weight.device)
