"""Undo for the base weights an adapter's creation rewrites (LoRA's PiSSA / OLoRA inits), if the
operation creating it fails.

`add_adapter`, `get_peft_model`, `from_pretrained` and `load_adapter` promise that a failure leaves
the model as it was. Removing the injected layers restores the module tree, but an init that
replaced a base weight W by its residual W - s B A has changed a tensor the model keeps. Such an
init calls `record_base_weight(param)` before writing; while an operation runs inside
`restoring_base_weights_on_failure()`, the original values are kept (on the CPU, so accelerator
memory is not doubled) and copied back, exactly, if the operation raises. Contexts nest: an inner
one that succeeds hands nothing back, an outer one that fails still restores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_JOURNALS: ContextVar[tuple[list[tuple[torch.Tensor, torch.Tensor]], ...]] = ContextVar("peftkit_base_journals", default=())


@contextmanager
def restoring_base_weights_on_failure() -> Iterator[None]:
    """Inside: base weights recorded with `record_base_weight` are put back if the body raises."""
    journal: list[tuple[torch.Tensor, torch.Tensor]] = []
    token = _JOURNALS.set(_JOURNALS.get() + (journal,))
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for param, original in reversed(journal):  # newest first: the oldest copy is the original
                param.copy_(original.to(param.device))
        raise
    finally:
        _JOURNALS.reset(token)


def record_base_weight(param: torch.Tensor) -> None:
    """Call before rewriting `param` in place: keep its values for the open contexts (none: nothing kept)."""
    journals = _JOURNALS.get()
    if not journals or param.is_meta:
        return
    original = param.detach().to("cpu", copy=True)
    for journal in journals:
        journal.append((param, original))
