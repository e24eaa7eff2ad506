"""Checkpoint keys of tensors the tuner holds itself (VeRA's projections, FRoD's bases, Shadow's backbone).

peft writes them as `base_model.<attribute>...`, without the `model.` segment of layer keys
(`base_model.model.<module path>...`): the tuner is `base_model`, the wrapped model its `model`.
A tuner returns such tensors from `extra_adapter_state` under `TUNER_KEY_PREFIX + <attribute>`;
the shared state-dict code puts the wrapper's prefix before every key, so saving takes it off
again (`tuner_keys_as_peft`), and loading finds the keys where the map puts them.
"""

from __future__ import annotations

import torch

TUNER_KEY_PREFIX = "base_model."


def tuner_keys_as_peft(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`state` with `<prefix>base_model.<attr>...` keys written as peft writes them, `base_model.<attr>...`."""
    tuner_prefix = prefix + TUNER_KEY_PREFIX
    return {(key[len(prefix):] if key.startswith(tuner_prefix) else key): tensor for key, tensor in state.items()}
