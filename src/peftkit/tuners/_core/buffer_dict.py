"""`BufferDict`: frozen per-adapter tensors held as buffers of one module, keyed by adapter name."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class BufferDict(nn.Module):
    """Frozen per-adapter tensors registered as buffers, keyed by adapter name (peft's `BufferDict`).

    `persistent` decides whether they appear in `state_dict()` (peft's switch for RandLoRA's bases
    and UniLoRA's indices); changing it applies to the tensors already held too.
    """

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self._persistent = persistent

    @property
    def persistent(self) -> bool:
        return self._persistent

    @persistent.setter
    def persistent(self, value: bool) -> None:
        self._persistent = bool(value)
        for key in self._buffers:
            if value:
                self._non_persistent_buffers_set.discard(key)
            else:
                self._non_persistent_buffers_set.add(key)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self._persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def values(self):
        return self._buffers.values()

    def items(self):
        return self._buffers.items()
