"""peft's functional API (`peft.functional`) on models without a PeftModel: inject, switch, delete,
gradients and dtype casting, checked against the tuner's own behaviour and against peft's functions."""

from __future__ import annotations

import warnings

import pytest
import torch

from peftkit import LoraConfig
from peftkit.functional import (
    cast_adapter_dtype,
    delete_adapter,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_adapter,
    set_peft_model_state_dict,
    set_requires_grad,
)
from tests.properties import assert_close, assert_differs
from tests.tiny_models import llama, lm_inputs


def _two_adapters():
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), llama())
    torch.manual_seed(1)
    model = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, modules_to_save=["lm_head"]), model, "other"
    )
    return model


def _logits(model):
    with torch.no_grad():
        return model(**{k: v for k, v in lm_inputs().items() if k != "labels"}).logits


def test_set_adapter_switches_every_layer_and_freezes_with_inference_mode():
    model = _two_adapters()
    set_adapter(model, "default")
    first = _logits(model)
    set_adapter(model, "other")
    second = _logits(model)
    assert_differs(first, second)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.active_adapters == ["other"] and model.lm_head.active_adapter == "other"
    assert layer.lora_A["other"].weight.requires_grad and not layer.lora_A["default"].weight.requires_grad
    set_adapter(model, "default", inference_mode=True)
    assert_close(_logits(model), first)
    assert not any(p.requires_grad for p in model.parameters())


def test_set_requires_grad_touches_only_the_named_adapter():
    model = _two_adapters()
    set_adapter(model, "default")
    set_requires_grad(model, "other", True)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["other"].weight.requires_grad and layer.lora_A["default"].weight.requires_grad
    set_requires_grad(model, ["default"], False)
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_A["other"].weight.requires_grad


def test_delete_adapter_returns_the_remaining_active_adapters():
    model = _two_adapters()
    set_adapter(model, "other")
    assert delete_adapter(model, "other", prefix="lora_") == ["default"]
    layer = model.model.layers[0].self_attn.q_proj
    assert "other" not in layer.lora_A and layer.active_adapters == ["default"]
    assert "other" not in model.lm_head.held_adapters()
    assert not any(".other" in k for k in get_peft_model_state_dict(model, adapter_name="default"))
    alone = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), llama())
    assert_close(_logits(model), _logits(alone))


def test_cast_adapter_dtype_upcasts_low_precision_adapters_only():
    model = _two_adapters()
    layer = model.model.layers[0].self_attn.q_proj
    for module in (layer.lora_A["default"], layer.lora_B["default"]):
        module.half()
    layer.lora_A["other"].half()
    cast_adapter_dtype(model, "default", autocast_adapter_dtype=False)
    assert layer.lora_A["default"].weight.dtype == torch.float16
    cast_adapter_dtype(model, "default")
    assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == torch.float32
    assert layer.lora_A["other"].weight.dtype == torch.float16, "other adapters are left alone"


def test_state_dict_round_trip_through_the_functional_names():
    model = _two_adapters()
    state = get_peft_model_state_dict(model, adapter_name="other")
    fresh = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), llama(), "other")
    result = set_peft_model_state_dict(fresh, state, adapter_name="other")
    assert not result.unexpected_keys
    set_adapter(model, "other")
    assert_close(_logits(fresh), _logits(model))


def test_same_effects_as_pefts_functions():
    peft_functional = pytest.importorskip("peft.functional")
    import peft

    def theirs_model():
        base = llama()
        base = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), base)
        torch.manual_seed(1)
        return peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), base, "other")

    def ours_model():
        base = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), llama())
        torch.manual_seed(1)
        return inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), base, "other")

    theirs, ours = theirs_model(), ours_model()
    for functional, model in ((peft_functional, theirs), (None, ours)):
        switch = functional.set_adapter if functional else set_adapter
        switch(model, "other")
    assert_close(_logits(ours), _logits(theirs), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert peft_functional.delete_adapter(theirs, "other", prefix="lora_") == delete_adapter(ours, "other", prefix="lora_")
    assert_close(_logits(ours), _logits(theirs), atol=1e-6)
    grads = {}
    for functional, model in ((peft_functional, theirs), (None, ours)):
        (functional.set_requires_grad if functional else set_requires_grad)(model, "default", False)
        grads[functional is None] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert grads[True] == grads[False]
