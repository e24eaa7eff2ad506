"""The method contract of `tuners/_core`: what a new method declares, and what it gets for free.

A toy additive method (a full-rank `delta_W` per adapter) is written here against the contract
alone -- `layer_cls`, `dispatchers`, `layer_kwargs`, `get_delta_weight` -- and must get injection,
several adapters, merging over dense and quantized bases, and the errors, from the core.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.errors import AdapterStateError, TargetModulesError
from peftkit.quantization import Linear4bit, QuantizationConfig, quantize_model
from peftkit.quantization.weights import is_quantized, read_weight, write_weight
from peftkit.tuners._core.base_layers import base_of, is_linear_like, is_transposed
from peftkit.tuners._core.layer import BaseTunerLayer
from peftkit.tuners._core.tuner import BaseTuner
from tests.tiny_models import gpt2, llama, lm_inputs


class ToyLayer(BaseTunerLayer, nn.Module):
    """y = base(x) + x delta_W^T; delta_W (out, in) per adapter, zero at start."""

    adapter_layer_names = ("toy_delta",)
    other_param_names = ("toy_scale",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.toy_delta = nn.ParameterDict({})
        self.toy_scale: dict[str, float] = {}
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **kwargs)

    def update_layer(self, adapter_name: str, scale: float) -> None:
        base = self.get_base_layer()
        self.toy_delta[adapter_name] = nn.Parameter(torch.zeros(base.out_features, base.in_features))
        self.toy_scale[adapter_name] = scale
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.toy_delta[adapter_name] * self.toy_scale[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name in self.toy_delta:
                result = result + (x.to(torch.float32) @ self.get_delta_weight(name).T).to(result.dtype)
        return result


class OtherToyLayer(ToyLayer):
    """Same maths; only its type tells which dispatcher built it."""


def dispatch_toy(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[ToyLayer]:
    base = base_of(target)
    if not is_linear_like(base) or is_transposed(base):  # Conv1D is refused, to test the error
        return None
    return ToyLayer(target, adapter_name, **kwargs)


def dispatch_other(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[ToyLayer]:
    return OtherToyLayer(target, adapter_name, **kwargs) if isinstance(target, nn.Linear) else None


class ToyTuner(BaseTuner):
    prefix = "toy_"
    layer_cls = ToyLayer
    dispatchers = (dispatch_toy, dispatch_other)
    display_name = "Toy"
    supported_layers = "torch.nn.Linear and quantized linear layers"

    def layer_kwargs(self, config: Any, adapter_name: str, key: str, target: nn.Module) -> dict[str, Any]:
        return {"scale": config.lora_alpha}


def toy_config(**overrides: Any) -> LoraConfig:
    """The toy reads target_modules (as every method) and lora_alpha as its scale."""
    return LoraConfig(**{"target_modules": ["q_proj", "v_proj"], "lora_alpha": 2, **overrides})


def randomize(tuner: BaseTuner, adapter_name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tuner.tuner_layers():
            delta = layer.toy_delta[adapter_name]
            delta.copy_(torch.randn(delta.shape, generator=generator) * 0.05)


def logits(tuner: BaseTuner) -> torch.Tensor:
    with torch.no_grad():
        return tuner(**lm_inputs()).logits


def test_injection_wraps_the_targets_and_a_second_adapter_updates_the_same_layers():
    tuner = ToyTuner(llama(), toy_config())
    wrapped = dict(tuner.tuner_layers())
    assert sorted(wrapped) == sorted(tuner.targeted_module_names)
    assert all(key.endswith(("q_proj", "v_proj")) for key in wrapped)
    assert all(type(layer) is ToyLayer for layer in wrapped.values())  # the first dispatcher that matches wins
    tuner.add_adapter("second", toy_config(lora_alpha=3))
    again = dict(tuner.tuner_layers())
    assert all(again[key] is wrapped[key] for key in wrapped)  # updated, not re-wrapped
    assert all(layer.toy_scale == {"default": 2, "second": 3} for layer in again.values())


def test_dispatchers_are_tried_in_order():
    class Reordered(ToyTuner):
        dispatchers = (dispatch_other, dispatch_toy)

    tuner = Reordered(llama(), toy_config())
    assert {type(layer) for _, layer in tuner.tuner_layers()} == {OtherToyLayer}


def test_merge_and_unmerge_come_from_the_core():
    tuner = ToyTuner(llama(), toy_config())
    randomize(tuner, "default", seed=0)
    layer = next(layer for _, layer in tuner.tuner_layers())
    before = layer.get_base_layer().weight.detach().clone()
    storage = layer.get_base_layer().weight.data_ptr()
    unmerged = logits(tuner)
    tuner.merge_adapter()
    assert layer.merged and torch.allclose(logits(tuner), unmerged, atol=1e-5)
    assert layer.get_base_layer().weight.data_ptr() == storage  # merged in place
    assert torch.allclose(layer.get_base_layer().weight, before + layer.get_delta_weight("default"))
    tuner.unmerge_adapter()
    assert not layer.merged and torch.allclose(layer.get_base_layer().weight, before, atol=1e-6)


def test_merge_over_a_quantized_base_needs_nothing_from_the_method():
    model = quantize_model(llama(), QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    tuner = ToyTuner(model, toy_config())
    randomize(tuner, "default", seed=1)
    layer = next(layer for _, layer in tuner.tuner_layers())
    assert isinstance(layer.get_base_layer(), Linear4bit) and is_quantized(layer.get_base_layer())
    dense = read_weight(layer.get_base_layer()).clone()
    expected = copy.deepcopy(layer.get_base_layer())
    with pytest.warns(UserWarning, match="re-quantizes"):
        tuner.merge_adapter()
    assert layer.merged
    # The codes are exactly those of quantize(W + delta_W).
    with pytest.warns(UserWarning, match="re-quantizes"):
        write_weight(expected, dense + layer.get_delta_weight("default").detach())
    assert torch.equal(layer.get_base_layer().weight, expected.weight)
    with pytest.warns(UserWarning, match="re-quantizes"):
        tuner.unmerge_adapter()
    assert not layer.merged and (read_weight(layer.get_base_layer()) - dense).abs().mean() < 0.1 * dense.abs().mean()


def test_unsupported_target_is_refused_before_anything_changes():
    model = gpt2()  # its projections are Conv1D, which the toy refuses
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TargetModulesError, match=r"Target module 'transformer\.h\.0\.attn\.c_attn' is a Conv1D, which Toy cannot wrap. Supported: torch\.nn\.Linear and quantized linear layers"):
        ToyTuner(model, toy_config(target_modules=["c_attn"]))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failed_safe_merge_leaves_the_layer_as_it_was():
    """Two adapters merged at once, the second broken: neither is merged, the weight is untouched."""
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("broken", LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["broken"].weight[0, 0] = float("nan")
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(AdapterStateError, match="'broken' gives NaN/inf weights"):
        model.merge_adapter(["default", "broken"], safe_merge=True)
    assert layer.merged_adapters == []
    assert torch.equal(layer.get_base_layer().weight, before)


def test_layout_follows_the_base_and_the_config_records_it():
    """As peft: fan_in_fan_out comes from the layer (True only for Conv1D), with a warning when the config disagrees."""
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False"):
        model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is False
    assert model.base_model.model.model.layers[0].self_attn.q_proj.fan_in_fan_out is False
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True"):
        model = get_peft_model(gpt2(), LoraConfig(target_modules=["c_attn"]))
    assert model.peft_config["default"].fan_in_fan_out is True
