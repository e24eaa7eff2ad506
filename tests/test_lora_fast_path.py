"""The fused LoRA path (`tuners/lora/fused.py`) computes what the plain module composition does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, get_peft_model
from peftkit.tuners.lora.fused import (
    draw_dropout, drop_threshold, dropped_positions, fast_mask_supported, keep_mask, keep_of,
)


def _lora_linear(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(model, config)


def _plain_forward(layer: nn.Module, x: torch.Tensor, keep: torch.Tensor | None, keep_probability: float) -> torch.Tensor:
    """The composed ops the fused function replaces, with the given dropout mask."""
    dropped = x if keep is None else x * keep / keep_probability
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    return layer.base_layer(x) + lora_b(lora_a(dropped)) * layer.scaling["default"]


def _draw_keep(x: torch.Tensor, dropout: float) -> tuple[torch.Tensor | None, float]:
    """The keep mask (and q) that the fused call drew from the same seed."""
    if not dropout:
        return None, 1.0
    drop, keep_probability = draw_dropout(x, dropout)
    return keep_of(drop, x), keep_probability


@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.5])  # 0.1: dropped positions; 0.5: the int16-word mask
def test_fused_matches_plain_outputs_and_grads(dropout: float) -> None:
    model = _lora_linear(dropout)
    model.train()
    layer = model.base_model.model[0]
    x = torch.randn(3, 5, 24, requires_grad=True)

    torch.manual_seed(123)
    fused = layer(x)
    fused.square().mean().backward()
    fused_grads = [x.grad.clone(), layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()]
    layer.zero_grad()
    x.grad = None

    torch.manual_seed(123)  # the same draw as the fused call made
    keep, keep_probability = _draw_keep(x, dropout)
    plain = _plain_forward(layer, x, keep, keep_probability)
    plain.square().mean().backward()
    plain_grads = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]

    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for got, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_eval_mode_has_no_dropout() -> None:
    model = _lora_linear(0.5)
    model.eval()
    x = torch.randn(4, 24)
    torch.testing.assert_close(model(x), model(x))
    layer = model.base_model.model[0]
    torch.testing.assert_close(layer(x), _plain_forward(layer, x, None, 1.0), atol=1e-5, rtol=1e-5)


def test_keep_mask_rate_and_rounding() -> None:
    torch.manual_seed(0)
    x = torch.empty(200_000)
    keep, keep_probability = keep_mask(x, 0.3)
    assert keep.shape == x.shape and keep.dtype == torch.bool
    assert keep_probability == pytest.approx(1 - drop_threshold(0.3) / 65536)
    assert keep.float().mean().item() == pytest.approx(keep_probability, abs=0.005)
    assert not fast_mask_supported(1.0) and not fast_mask_supported(1e-6) and fast_mask_supported(0.05)


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_dropped_positions_drop_each_element_with_probability_p(p: float) -> None:
    """Poisson splitting makes the drops exact Bernoulli(p): the rate is p, not 1 - exp(-p), and even."""
    torch.manual_seed(0)
    x = torch.empty(400, 500)
    rates = []
    for _ in range(5):
        keep = keep_of(dropped_positions(x, p), x)
        assert keep.shape == x.shape and keep.dtype == torch.bool
        rates.append(1 - keep.float().mean().item())
        halves = keep.view(2, -1).float().mean(1)
        assert abs(halves[0] - halves[1]).item() < 0.01  # no part of the tensor favoured
    assert sum(rates) / len(rates) == pytest.approx(p, abs=0.002)  # std of the mean ~0.0004 at p = 0.2
    assert max(rates) - min(rates) > 0  # fresh draws


def test_draw_dropout_picks_positions_on_cpu_for_low_rates_and_words_otherwise() -> None:
    x = torch.empty(64, 32)
    drop, keep_probability = draw_dropout(x, 0.1)
    assert drop.dtype == torch.int64 and drop.dim() == 1 and keep_probability == 0.9
    assert int(drop.max()) < x.numel()
    drop, keep_probability = draw_dropout(x, 0.3)
    assert drop.dtype == torch.bool and drop.shape == x.shape
    assert keep_probability == 1 - drop_threshold(0.3) / 65536


def test_hooked_modules_take_the_plain_path() -> None:
    model = _lora_linear(0.0)
    layer = model.base_model.model[0]
    seen = []
    layer.lora_A["default"].register_forward_hook(lambda *_: seen.append(1))
    layer(torch.randn(2, 24))
    assert seen == [1]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compile_has_no_graph_breaks(dropout: float) -> None:
    torch._dynamo.reset()
    model = _lora_linear(dropout)
    model.train()
    x = torch.randn(2, 24)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x).sum().backward()
    assert model.base_model.model[0].lora_A["default"].weight.grad is not None


def test_dora_folded_scale_matches_plain_product() -> None:
    from peftkit.tuners.lora.layer import LoraLayer

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(24, 40)),
                           LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(3, 5, 24)
    grads = []
    for method in (layer.rescaled_low_rank_output, lambda *a: LoraLayer.rescaled_low_rank_output(layer, *a)):
        scale = layer.lora_magnitude_vector["default"].weight * 0.5
        out = method(x, "default", scale)
        out.square().mean().backward()
        grads.append((out.detach(), *(p.grad.clone() for p in layer.adapter_params(["default"]))))
        layer.zero_grad()
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _fused_node(output: torch.Tensor) -> bool:
    return type(output.grad_fn).__name__ == "LoraLinearFunctionBackward"


def _layer_grads(layer: nn.Module, x: torch.Tensor, seed: int, forward) -> list[torch.Tensor]:
    """Output, then the gradients of x and of every parameter that wants one, for `forward(x)`."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(seed)
    out = forward(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    params = [p for p in layer.parameters() if p.requires_grad]
    return [out.detach(), x.grad.clone(), *(p.grad.clone() for p in params)]


@pytest.mark.parametrize("base_kind", ["linear_bias", "linear_no_bias", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.2, 0.5])
def test_whole_layer_matches_composed_ops_with_trainable_base(base_kind: str, dropout: float) -> None:
    """Base output, bias, Conv1D's (in, out) weight and a base that trains too: all as the composed ops."""
    torch.manual_seed(0)
    base = {"linear_bias": nn.Linear(24, 40), "linear_no_bias": nn.Linear(24, 40, bias=False),
            "conv1d": Conv1D(40, 24)}[base_kind]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=dropout, init_lora_weights=False,
                        fan_in_fan_out=base_kind == "conv1d")
    model = get_peft_model(nn.Sequential(base), config)
    model.train()
    layer = model.base_model.model[0]
    layer.base_layer.requires_grad_(True)
    x = torch.randn(3, 5, 24).transpose(0, 1)  # non-contiguous on purpose (Conv1D itself needs contiguous)
    x = (x.contiguous() if base_kind == "conv1d" else x).requires_grad_()

    def composed(inp: torch.Tensor) -> torch.Tensor:
        keep, keep_probability = _draw_keep(inp, dropout)
        return _plain_forward(layer, inp, keep, keep_probability)

    fused = _layer_grads(layer, x, 7, layer)
    assert _fused_node(layer(x))
    expected = _layer_grads(layer, x, 7, composed)
    assert len(fused) == len(expected) == 6 - (base_kind == "linear_no_bias")
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_input_without_grad_and_frozen_base_get_no_gradient_work() -> None:
    model = _lora_linear(0.0)
    layer = model.base_model.model[0]
    out = layer(torch.randn(4, 24))
    assert _fused_node(out)
    out.sum().backward()
    assert layer.base_layer.weight.grad is None and layer.lora_A["default"].weight.grad is not None


def test_cases_the_whole_layer_function_leaves_to_the_module_path() -> None:
    """Two active adapters, DoRA, a hooked base, mixed dtypes, a disabled adapter: not fused, still right."""
    model = _lora_linear(0.0)
    layer = model.base_model.model[0]
    x = torch.randn(4, 24)
    assert _fused_node(layer(x))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    layer.set_adapter(["default", "other"])
    both = layer(x)
    assert not _fused_node(both)
    expected = layer.base_layer(x) + sum(
        layer.lora_B[n](layer.lora_A[n](x)) * layer.scaling[n] for n in ("default", "other"))
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)
    layer.set_adapter("default")
    handle = layer.base_layer.register_forward_hook(lambda *_: None)
    assert not _fused_node(layer(x))
    handle.remove()
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.base_layer.double()
    assert not _fused_node(layer(x.double()))


@pytest.mark.parametrize("p", [0.1, 0.25])  # dropped positions / the int16-word mask
def test_apply_dropout_is_inverted_dropout_with_the_cheap_mask(p: float) -> None:
    """Kept entries are x / q, dropped ones 0, at rate ~p; gradients flow through the same mask."""
    model = _lora_linear(p)
    model.train()
    layer = model.base_model.model[0]
    x = torch.randn(24, 400).abs().add_(0.1).t().requires_grad_()  # non-contiguous on purpose
    torch.manual_seed(5)
    dropped = layer.apply_dropout(x, "default")
    keep = dropped != 0
    keep_probability = 1 - drop_threshold(p) / 65536 if p > 0.2 else 1 - p
    torch.testing.assert_close(dropped[keep], x[keep] / keep_probability)
    assert keep.float().mean().item() == pytest.approx(1 - p, abs=0.02)
    dropped.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() / keep_probability)
    layer.lora_dropout["default"].register_forward_hook(lambda *_: None)  # observed: nn.Dropout itself runs
    torch.manual_seed(5)
    expected = nn.functional.dropout(x, p)
    torch.manual_seed(5)
    torch.testing.assert_close(layer.apply_dropout(x, "default"), expected)
