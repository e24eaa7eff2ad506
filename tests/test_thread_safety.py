"""One model serving several threads at once: every call's output equals the same call run alone.

Per-call state (each row's adapter, aLoRA's offsets) travels with the call (`_core/call_state.py`),
and the weight swaps of MultiheadAttention / target_parameters LoRA are serialized per module, so
concurrent calls never see each other's state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from peftkit import AdapterStateError, LoraConfig, get_peft_model
from peftkit.tuners._core.call_state import alora_offsets, batch_adapter_names
from tests.tiny_models import llama

THREADS = 4
CALLS_PER_THREAD = 12
JOIN_TIMEOUT_S = 60.0


def _run_threads(calls: Sequence[Callable[[], torch.Tensor]], expected: Sequence[torch.Tensor]) -> list[str]:
    """Run `calls` round-robin from THREADS threads at once (each thread CALLS_PER_THREAD of them, all
    released together); the list of mismatches against `expected` (empty: every output was right)."""
    barrier = threading.Barrier(THREADS)
    wrong: list[str] = []
    errors: list[BaseException] = []

    def worker(worker_id: int) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT_S)
            for step in range(CALLS_PER_THREAD):
                index = (worker_id + step * THREADS) % len(calls)
                with torch.no_grad():
                    got = calls[index]()
                if not torch.allclose(got, expected[index], atol=1e-5, rtol=1e-4):
                    wrong.append(f"thread {worker_id} call {index}")
        except BaseException as error:  # noqa: BLE001 -- reported to the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "threads did not finish in time"
    if errors:
        raise errors[0]
    return wrong


def _expected(calls: Sequence[Callable[[], torch.Tensor]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [call() for call in calls]


# ---------------------------------------------------------------------- mixed-adapter batches
def _mixed_model():
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    model = get_peft_model(
        llama(),
        LoraConfig(task_type="CAUSAL_LM", target_modules=targets, modules_to_save=["lm_head"], init_lora_weights=False),
    )
    model.add_adapter("big", LoraConfig(r=8, lora_alpha=4, target_modules=targets, modules_to_save=["lm_head"],
                                        init_lora_weights=False))
    model.add_adapter("small", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():  # give each adapter's head copy its own weights, so the head differs per row too
        for offset, name in enumerate(["default", "big"], start=1):
            model.base_model.model.lm_head.modules_to_save[name].weight.mul_(1 + 0.5 * offset)
    return model.eval()


NAME_SETS = [
    ["default", "big", "__base__", "small"],
    ["__base__", "small", "big", "default"],
    ["big", "big", "default", "__base__"],
    ["small", "__base__", "__base__", "big"],
    ["default", "default", "small", "small"],
    ["__base__", "__base__", "__base__", "__base__"],
    ["big", "default", "small", "default"],
]


def _ids(seed: int, rows: int = 4, length: int = 6) -> torch.Tensor:
    return torch.randint(2, 96, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_mixed_batches_from_four_threads_equal_each_call_alone():
    model = _mixed_model()
    calls = [
        (lambda ids=_ids(seed), names=names: model(input_ids=ids, adapter_names=names).logits)
        for seed, names in enumerate(NAME_SETS)
    ]
    expected = _expected(calls)
    assert not torch.allclose(expected[0][0], expected[0][1], atol=1e-3), "rows must differ per adapter"
    assert _run_threads(calls, expected) == []


def test_mixed_generate_from_threads_equals_each_call_alone():
    model = _mixed_model()
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    calls = [
        (lambda ids=_ids(seed, rows=4, length=4), names=names:
         model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs).float())
        for seed, names in enumerate(NAME_SETS[:4])
    ]
    assert _run_threads(calls, _expected(calls)) == []


def test_plain_calls_in_other_threads_are_not_mixed_batches():
    """A call without adapter_names runs the active adapter even while other threads run mixed batches."""
    model = _mixed_model()
    plain_ids = _ids(99)
    calls = []
    for seed, names in enumerate(NAME_SETS[:3]):
        calls.append(lambda ids=_ids(seed), names=names: model(input_ids=ids, adapter_names=names).logits)
        calls.append(lambda: model(input_ids=plain_ids).logits)
    assert _run_threads(calls, _expected(calls)) == []


# ---------------------------------------------------------------------- aLoRA offsets
INVOCATION = [5, 6, 7]


def test_alora_offsets_from_threads_equal_each_call_alone():
    torch.manual_seed(1)
    model = get_peft_model(llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False, alora_invocation_tokens=INVOCATION)).eval()
    ids = torch.tensor([[10, 11, 12, 5, 6, 7, 20, 21], [30, 31, 5, 6, 7, 34, 35, 36], [5, 6, 7, 1, 2, 3, 4, 8]])
    offsets = [[8, 0, 2], [1, 5, 8], None, [0, 0, 0], [3, 3, 3]]
    calls = [(lambda given=given: model(input_ids=ids, alora_offsets=given).logits) for given in offsets]
    expected = _expected(calls)
    assert not torch.allclose(expected[0], expected[1], atol=1e-4), "offsets must change the output"
    assert _run_threads(calls, expected) == []


# ---------------------------------------------------------------------- swapped weights
class AttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2)
        self.lin0 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.mha(x, x, x)[0])


class Experts(nn.Module):
    """A mixture-of-experts stack (E, out, in): a bare 3-D parameter, as target_parameters adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 24, 16) / 3)
        self.down_proj = nn.Parameter(torch.randn(3, 16, 24) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(x @ self.gate_up_proj.transpose(1, 2))
        return hidden @ self.down_proj.transpose(1, 2)


class ExpertsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x.unsqueeze(0).expand(3, -1, -1))


def _swap_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mha":
        return get_peft_model(AttentionModel(), LoraConfig(target_modules=["mha"], init_lora_weights=False)).eval()
    config = LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False)
    model = get_peft_model(ExpertsModel(), config)
    with torch.no_grad():  # a clearly visible update
        for param in model.parameters():
            if param.requires_grad:
                param.mul_(3)
    return model.eval()


def _swap_inputs(kind: str, seed: int) -> torch.Tensor:
    shape = (64, 8, 16) if kind == "mha" else (256, 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["mha", "target_parameters"])
def test_swapped_weights_from_threads_equal_each_call_alone(kind: str):
    model = _swap_model(kind)
    base_params = {name: param for name, param in model.named_parameters()}
    calls = [(lambda x=_swap_inputs(kind, seed): model(x)) for seed in range(6)]
    expected = _expected(calls)
    with model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(model(_swap_inputs(kind, 0)), expected[0], atol=1e-3), "the adapter must matter"
    assert _run_threads(calls, expected) == []
    # every swap was put back: the module holds its own parameters again
    after = dict(model.named_parameters())
    assert after.keys() == base_params.keys()
    assert all(after[name] is param for name, param in base_params.items())


# ---------------------------------------------------------------------- state never outlives its call
def test_a_failed_mixed_call_leaves_no_state_behind():
    model = _mixed_model()
    ids = _ids(3)
    expected = _expected([lambda: model(input_ids=ids).logits])[0]
    with pytest.raises(AdapterStateError, match="Length of `adapter_names`"), torch.no_grad():
        model(input_ids=ids, adapter_names=["big", "small", "default"])  # 3 names for 4 rows
    assert batch_adapter_names() is None and alora_offsets() is None
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)


def test_a_nested_call_without_names_runs_its_own_adapters():
    """Inside a mixed call (e.g. an assistant model called by generate) another model's plain call is no mixed batch."""
    outer, inner = _mixed_model(), _mixed_model()
    ids = _ids(4)
    expected = _expected([lambda: inner(input_ids=ids).logits])[0]
    seen = []
    hook = outer.base_model.model.lm_head.register_forward_hook(lambda *_: seen.append(inner(input_ids=ids).logits))
    try:
        with torch.no_grad():
            outer(input_ids=ids, adapter_names=NAME_SETS[0])
    finally:
        hook.remove()
    assert len(seen) == 1 and torch.allclose(seen[0], expected, atol=1e-6)


# ---------------------------------------------------------------------- torch.compile keeps working
@pytest.mark.parametrize("kind", ["mha", "target_parameters"])
def test_compiled_swaps_have_no_graph_breaks_and_match_eager(kind: str):
    torch._dynamo.reset()
    model = _swap_model(kind)
    params = dict(model.named_parameters())
    x = _swap_inputs(kind, 0)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(model, backend="aot_eager")
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert all(dict(model.named_parameters())[name] is param for name, param in params.items())


def test_compiled_mixed_batches_follow_each_calls_names():
    torch._dynamo.reset()
    model = _mixed_model()
    ids = _ids(5)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for names in [NAME_SETS[0], NAME_SETS[1], None, NAME_SETS[0]]:
            kwargs = {} if names is None else {"adapter_names": names}
            assert torch.allclose(compiled(input_ids=ids, **kwargs).logits, model(input_ids=ids, **kwargs).logits,
                                  atol=1e-5), names
