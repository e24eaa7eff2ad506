"""The benchmark scripts (`bench/`) on a tiny model: every row builds and trains what it says, peft's
rows match ours in size, and the table and floors compute what they claim. Nothing here is timed."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from transformers import LlamaConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import floors  # noqa: E402
import paired  # noqa: E402
import run_all  # noqa: E402
import workloads  # noqa: E402

HAS_PEFT = importlib.util.find_spec("peft") is not None
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=100, max_position_embeddings=64)


@pytest.fixture
def tiny_workload(monkeypatch):
    """The bench's workload shrunk to a 2-layer, 32-wide Llama with a 100-token vocabulary."""
    monkeypatch.setattr(workloads, "llama_config", lambda layers=8: LlamaConfig(**TINY))
    monkeypatch.setattr(workloads, "VOCAB", TINY["vocab_size"])
    return workloads.make_batch(batch=2, seq=8)


def _trained(row: str, lib: str, ids: torch.Tensor) -> tuple[int, bool, bool]:
    """(trainable count, whether a step changed the trainable parameters, whether it changed anything else)."""
    model, params = workloads.build(row, lib)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before = [p.detach().clone() for p in params], [p.detach().clone() for p in frozen]
    workloads.make_step(model.train(), params, ids)()
    trained = any(not torch.equal(p, b) for p, b in zip(params, before[0]))
    touched = any(not torch.equal(p, b) for p, b in zip(frozen, before[1]))
    return sum(p.numel() for p in params), trained, touched


@pytest.mark.parametrize("row", [row for row in workloads.ROWS if row != "frozen"])
def test_every_row_trains_only_its_trainable_parameters(tiny_workload, row):
    count, trained, touched = _trained(row, "peftkit", tiny_workload)
    assert count > 0 and trained and not touched
    if row.startswith("lora") or row.startswith("dora"):
        per_layer = sum(i + o for i, o in [(32, 32)] * 4 + [(32, 64)] * 2 + [(64, 32)])  # q k v o, gate up, down
        assert count == 2 * 16 * per_layer + (2 * (4 * 32 + 2 * 64 + 32) if row.startswith("dora") else 0)


def test_frozen_bound_backpropagates_through_every_activation_and_trains_nothing(tiny_workload):
    model, params = workloads.build("frozen", "peftkit")
    assert params == [] and not any(p.requires_grad for p in model.parameters())
    seen = []
    model.model.layers[0].register_full_backward_hook(lambda _m, grad_in, _out: seen.append(grad_in[0]))
    workloads.make_step(model.train(), params, tiny_workload)()
    assert seen and seen[0] is not None  # the first decoder layer got an input gradient


@pytest.mark.skipif(not HAS_PEFT, reason="peft (test-only peer) not installed")
@pytest.mark.parametrize("row", [r for r in workloads.ROWS if r not in workloads.PEFTKIT_ONLY | {"frozen", "full"}])
def test_peft_rows_are_the_same_adapters(tiny_workload, row):
    """The '/ peft' column compares like with like: the same configs give the same trainable count."""
    ours, _, _ = _trained(row, "peftkit", tiny_workload)
    theirs, trained, touched = _trained(row, "peft", tiny_workload)
    assert ours == theirs and trained and not touched


def test_table_divides_by_the_bound_and_by_peft():
    row = {"step_ms": 150.0, "trainable": 1234, "peak_rss_mb": 900.0}
    results = {"frozen": {"peftkit": {"step_ms": 100.0, "trainable": 0, "peak_rss_mb": 800.0}},
               "lora_p0": {"peftkit": row, "peft": {"step_ms": 200.0, "trainable": 1234, "peak_rss_mb": 1000.0}},
               "bottleneck": {"peftkit": row}}
    lines = run_all.table(results).splitlines()
    assert lines[3] == "| lora_p0 | 150 | 1.50 | 0.75 | 200 | 1,234 | 900 | 1000 |"
    assert lines[4] == "| bottleneck | 150 | 1.50 | - | - | 1,234 | 900 | - |"


@pytest.mark.parametrize("kind", ["loha", "lora_r16", "dora_p05"])
def test_floor_layers_do_the_base_maths_plus_only_their_extra_matmuls(tiny_workload, kind):
    """Every LoRA target is replaced; the input gradient is the base layer's (doubled for dora_p05's
    second matmul on the same input; plus the tiny rank-16 path for lora_r16)."""
    model = floors.floor_model(kind)
    layers = [m for m in model.modules() if isinstance(m, floors.Floor)]
    assert len(layers) == 2 * len(workloads.LORA_TARGETS)
    layer = layers[0]
    x = torch.randn(3, 32, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    base = torch.nn.functional.linear(x, layer.base.weight)
    factor = 2.0 if kind == "dora_p05" else 1.0
    expected_grad = factor * layer.base.weight.sum(0).expand(3, -1)
    if kind == "lora_r16":
        base = base + x @ layer.a.t() @ layer.b.t()
        expected_grad = expected_grad + (layer.b @ layer.a).sum(0).expand(3, -1)
    torch.testing.assert_close(out, factor * base if kind == "dora_p05" else base)
    torch.testing.assert_close(x.grad, expected_grad)


def test_paired_ratio_is_the_median_of_per_pair_ratios(monkeypatch):
    """Steps alternate (frozen first); each pair's ratio is row / frozen, and warm-up pairs are not timed."""
    calls = []
    durations = iter([100.0, 150.0, 200.0, 220.0, 100.0, 130.0])  # frozen, row, frozen, row, ...
    monkeypatch.setattr(paired, "timed", lambda step: (step(), next(durations))[1])
    result = paired.paired_ratio(lambda: calls.append("f"), lambda: calls.append("r"), pairs=3, warmup=1)
    assert calls == ["f", "r"] * 4
    assert (result["ratio"], result["ratio_min"], result["ratio_max"]) == (1.3, 1.1, 1.5)
    assert (result["frozen_ms"], result["row_ms"]) == (100.0, 150.0)
