"""`ShadowCache`: the base model's KV cache and the shadow backbone's, travelling as one cache.

Incremental decoding advances two models: the base decoder (whose keys/values were computed under
injection) and the shadow backbone (which gives s0 for the new tokens). `generate` threads one
`past_key_values` object through its steps, so both caches ride in this pair: the model-level
pre-hook hands `base` to the base model and `shadow` to the backbone, and the post-hook packs the
two caches the step returns into a new pair.

Everything the generation loop asks of a cache (lengths, mask sizes, updates) is answered by the
base cache; operations that change the batch or sequence layout (reorder for beam search, crop,
repeat, select, reset) are applied to both, so they stay aligned.
"""

from __future__ import annotations

from typing import Any

from transformers import Cache

#: Layout changes applied to both caches.
_BOTH = ("reset", "reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices")
#: Methods answered by the base cache.
_BASE_METHODS = (
    "update", "get_seq_length", "get_mask_sizes", "get_max_length", "get_query_offset", "has_previous_state",
    "early_initialization", "prefetch", "offload", "get_conv_state", "update_conv_state", "get_recurrent_state",
    "update_recurrent_state", "update_indexer", "activate_past_recording", "is_recording_past",
    "__len__", "__iter__", "__getitem__",
)
#: Properties answered by the base cache.
_BASE_PROPERTIES = (
    "batch_size", "is_initialized", "is_croppable", "is_sliding", "is_linear", "is_dummy", "max_batch_size",
    "max_cache_len",
)


class ShadowCache(Cache):
    """(base cache, shadow-backbone cache); a transformers `Cache` that answers as its base cache."""

    def __init__(self, base: Any = None, shadow: Any = None) -> None:
        # Cache.__init__ is not called: the storage belongs to the two wrapped caches.
        self.base = base
        self.shadow = shadow

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "shadow") or name.startswith("__"):
            raise AttributeError(name)
        base = self.__dict__.get("base")
        if base is None:
            raise AttributeError(f"{type(self).__name__} has no base cache to read {name!r} from.")
        return getattr(base, name)

    @property
    def is_compileable(self) -> bool:
        return False  # two caches of different layouts are no single static cache

    def to_legacy_cache(self) -> Any:
        raise NotImplementedError("A ShadowCache holds two caches; it has no single legacy-tuple form.")

    def __repr__(self) -> str:
        return f"ShadowCache(base={self.base!r}, shadow={self.shadow!r})"


def _on_both(name: str):
    def method(self: ShadowCache, *args: Any, **kwargs: Any) -> None:
        for cache in (self.base, self.shadow):
            if cache is not None and hasattr(cache, name):
                getattr(cache, name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"`{name}` of both caches."
    return method


def _on_base(name: str):
    def method(self: ShadowCache, *args: Any, **kwargs: Any) -> Any:
        if self.base is None:
            raise AttributeError(f"{type(self).__name__} has no base cache for {name!r}.")
        return getattr(self.base, name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"`{name}` of the base cache."
    return method


def _base_property(name: str) -> property:
    return property(lambda self: getattr(self.base, name), doc=f"`{name}` of the base cache.")


for _name in _BOTH:
    setattr(ShadowCache, _name, _on_both(_name))
for _name in _BASE_METHODS:
    setattr(ShadowCache, _name, _on_base(_name))
for _name in _BASE_PROPERTIES:
    setattr(ShadowCache, _name, _base_property(_name))
del _name
