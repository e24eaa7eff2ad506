"""Per-call state: what one forward / generate call tells the adapter layers, carried by the call.

A call may say which adapter each batch row uses (`adapter_names=[...]`, mixed-adapter batches) and,
for aLoRA, from which position on each row is adapted (`alora_offsets`), and for Poly each row's task
(`task_ids`). Layers read this while the call runs. It is kept per thread (`threading.local`), set on entering the call and put back on
leaving it, never as attributes of the (shared) layers:

* one model may serve several threads at once; each thread sees only its own call's names/offsets;
* the value set by `generate` is seen by every forward of its decode loop (same thread, nested calls);
* `torch.compile` traces the reads and writes without graph breaks and guards on the values read
  (a different value takes or compiles another graph), as it did for the old layer attributes.

Why not `contextvars.ContextVar`: dynamo cannot trace `ContextVar.get` / `.set` (a graph break in
every adapter layer of a compiled model). What a ContextVar adds over a thread-local -- isolation
of asyncio tasks sharing a thread -- is not needed here: the state only lives during one synchronous
call, which no other task can interleave with. The values are plain tuples (of str / int / None),
so that dynamo guards on them by value. Threads started *inside* a call (e.g. `nn.DataParallel`'s
workers) do not inherit the state.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch

AdapterNames = Optional[tuple[str, ...]]
Offsets = Optional[tuple[Optional[int], ...]]

_STATE = threading.local()

#: Passed to `call_scope` for a value the scope leaves as it is.
KEEP = object()


def batch_adapter_names() -> AdapterNames:
    """The adapter of each batch row for this thread's running call (None: not a mixed-adapter batch)."""
    return getattr(_STATE, "adapter_names", None)


def alora_offsets() -> Offsets:
    """aLoRA's per-row offsets for this thread's running call (None: none, the aLoRA update is masked off)."""
    return getattr(_STATE, "alora_offsets", None)


@contextmanager
def call_scope(adapter_names: object = KEEP, offsets: object = KEEP) -> Iterator[None]:
    """For the block (in this thread only): the given per-call values, then the previous ones again.

    `KEEP` leaves a value as it is; None clears it (a nested call of another model runs its own
    adapters). Values are stored as tuples; nothing is written when they equal the current ones.
    """
    previous = {"adapter_names": batch_adapter_names(), "alora_offsets": alora_offsets()}
    wanted = {
        key: None if value is None else tuple(value)  # type: ignore[call-overload]
        for key, value in (("adapter_names", adapter_names), ("alora_offsets", offsets))
        if value is not KEEP
    }
    changed = {key: value for key, value in wanted.items() if value != previous[key]}
    for key, value in changed.items():
        setattr(_STATE, key, value)
    try:
        yield
    finally:
        for key in changed:
            setattr(_STATE, key, previous[key])


# ---------------------------------------------------------------------- task ids (layer methods such as Poly)
def task_ids() -> Optional[torch.Tensor]:
    """The task id of each batch row for this thread's running call (`model(..., task_ids=...)`), or None.

    For methods whose layers route by task (Poly's router picks each row's skill mixture with it);
    prompt learning takes `task_ids` from its own forward's keywords instead. A tensor, kept as given.
    """
    return getattr(_STATE, "task_ids", None)


@contextmanager
def task_ids_scope(ids: object) -> Iterator[None]:
    """For the block (this thread only): `task_ids()` is `ids` (None clears it), then the previous value again.

    A tuner's `per_call_context` (read by `PeftModel` for every forward / generate) pops `task_ids`
    from the call's keywords and enters this, so every layer -- and every forward of a generate
    loop -- sees the call's ids without them passing through the base model's signature.
    """
    previous = task_ids()
    _STATE.task_ids = ids
    try:
        yield
    finally:
        _STATE.task_ids = previous
