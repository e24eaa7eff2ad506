"""Where peft (the test-only reference) itself cannot run on the installed transformers.

Interop tests compare peftkit with peft; on transformers releases newer than peft knows, peft's own
prefix tuning can fail (0.21.2 on transformers 5.24 refuses BERT heads and re-adds the prefix at
every cached generate step). Those comparisons are skipped *only* when peft fails on its own,
found by running peft alone here (no version numbers): a peftkit failure is never skipped.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import pytest
import torch


def _versions() -> str:
    import peft
    import transformers

    return f"peft {peft.__version__} on transformers {transformers.__version__}"


@functools.cache
def peft_prefix_forward_failure(make_model: Callable[[], torch.nn.Module], make_inputs: Callable[[], dict],
                                task: str) -> Optional[str]:
    """Why peft's own prefix tuning cannot run a forward on this model here (None when it can)."""
    import peft

    try:
        model = peft.get_peft_model(make_model(), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=2))
        with torch.no_grad():
            model(**make_inputs())
    except Exception as error:  # noqa: BLE001 - any failure of peft alone means "no reference here"
        return f"{_versions()}: peft's own prefix tuning fails on {make_model.__name__} ({type(error).__name__}: {error})"
    return None


@functools.cache
def peft_prefix_generate_failure(make_model: Callable[[], torch.nn.Module]) -> Optional[str]:
    """Why peft's own prefix-tuning `generate()` is wrong here: cached decoding that differs from
    peft's own step-by-step greedy decoding without cache (None when they agree)."""
    import peft

    torch.manual_seed(3)
    model = peft.get_peft_model(make_model(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    try:
        with torch.no_grad():
            cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            greedy = ids
            for _ in range(4):
                logits = model(input_ids=greedy).logits[:, -1]
                greedy = torch.cat((greedy, logits.argmax(-1, keepdim=True)), dim=1)
    except Exception as error:  # noqa: BLE001
        return f"{_versions()}: peft's own prefix-tuning generate() fails ({type(error).__name__}: {error})"
    if not torch.equal(cached, greedy):
        return f"{_versions()}: peft's own prefix-tuning generate() differs from its greedy decoding without cache"
    return None


def skip_if_peft_fails(reason: Optional[str]) -> None:
    if reason is not None:
        pytest.skip(reason)
