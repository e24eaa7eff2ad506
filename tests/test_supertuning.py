"""Super-Tuning: config checks, the magnitude support and the scattered update by hand, the Supra LoRA
part, checkpoints with and without indices, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, PeftConfig, PeftModel, SupertuningConfig, get_peft_model
from peftkit.tuners.supertuning.layer import SupertuningLayer, magnitude_support, support_size
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> SupertuningConfig:
    """A random (non-identity) adapter training 10% of each weight, on the case's targets."""
    kwargs = dict(target_modules=TARGETS[name], init_weights=False, sparsity=0.9, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return SupertuningConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 4)
        self.emb = nn.Embedding(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(SupertuningConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.SupertuningConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    assert SupertuningConfig().sparsity == 0.99 and SupertuningConfig().r is None
    assert SupertuningConfig(r=4).lora_alpha == 8  # peft's default, written to the config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0.0, 1.0\), got 1.0"),
        ({"sparsity": -0.5}, r"sparsity must be in \[0.0, 1.0\)"),
        ({"r": 0}, "r must be a positive integer or None, got 0"),
        ({"r": 2.5}, "r must be a positive integer or None"),
        ({"lora_alpha": 4}, "lora_alpha is set but r is None"),
        ({"r": 2, "lora_dropout": 1.0}, r"lora_dropout must be in \[0.0, 1.0\)"),
        ({"select_top": "yes"}, "select_top='yes' is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SupertuningConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_not_saving_indices_warns():
    with pytest.warns(UserWarning, match="save_precomputed_indices=False"):
        SupertuningConfig(save_precomputed_indices=False)


def test_json_roundtrip_dispatches_to_supertuning(tmp_path):
    SupertuningConfig(sparsity=0.5, r=3, select_top=False, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is SupertuningConfig
    assert (loaded.sparsity, loaded.r, loaded.lora_alpha, loaded.select_top) == (0.5, 3, 6, False)


# ---------------------------------------------------------------------------------------------- the maths
def test_support_is_the_largest_or_smallest_magnitudes():
    weight = torch.tensor([[0.1, -3.0], [2.0, 0.01]])
    assert support_size(4, 0.5) == 2
    assert sorted(magnitude_support(weight, 0.5, True).tolist()) == [1, 2]
    assert sorted(magnitude_support(weight, 0.5, False).tolist()) == [0, 3]
    assert magnitude_support(weight, 0.5, True).dtype == torch.int32
    with pytest.raises(ConfigError, match="leaves no trainable entries"):
        magnitude_support(weight, 0.9, True)


def test_forward_scatters_the_values_into_the_weight():
    model = get_peft_model(MLP(), SupertuningConfig(target_modules=["lin0"], sparsity=0.75, init_weights=False))
    layer = model.base_model.model.lin0
    assert type(layer) is SupertuningLayer
    indices, values = layer.supertuning_indices["default"], layer.supertuning_values["default"]
    assert indices.shape == values.shape == (50,)  # int(200 * 0.25)
    weight = layer.get_base_layer().weight.detach().clone()
    adapted = weight.flatten().clone()
    adapted[indices.long()] += values.detach()
    adapted = adapted.reshape_as(weight)
    x = torch.randn(3, 10)
    with torch.no_grad():
        prop.assert_close(layer(x), x @ adapted.T + layer.get_base_layer().bias)
        prop.assert_close(layer.get_delta_weight("default"), adapted - weight)
    assert int((layer.get_delta_weight("default") != 0).sum()) == 50


def test_supra_adds_the_scaled_lora_part():
    model = get_peft_model(MLP(), SupertuningConfig(target_modules=["lin0"], sparsity=0.75, r=2, lora_alpha=6,
                                                   init_weights=False))
    layer = model.base_model.model.lin0
    a, b = layer.supertuning_lora_A["default"].weight, layer.supertuning_lora_B["default"].weight
    assert a.shape == (2, 10) and b.shape == (20, 2)
    sparse = layer.get_delta_weight("default") - 3.0 * (b @ a)
    assert int((sparse.abs() > 1e-6).sum()) == 50
    x = torch.randn(3, 10)
    with torch.no_grad():
        expected = x @ (layer.get_base_layer().weight + layer.get_delta_weight("default")).T + layer.get_base_layer().bias
        prop.assert_close(layer(x), expected)


def test_default_init_is_a_noop_and_trains_values_only():
    model = get_peft_model(MLP(), SupertuningConfig(target_modules=["lin0"], sparsity=0.5))
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.lin0.supertuning_values.default"]
    layer = model.base_model.model.lin0
    assert not bool(layer.get_delta_weight("default").any())


def test_only_linear_is_supported():
    with pytest.raises(TypeError, match=r"only `torch.nn.Linear` is supported"):
        get_peft_model(MLP(), SupertuningConfig(target_modules=["emb"]))
    with pytest.raises(TypeError, match=r"only `torch.nn.Linear` is supported"):
        get_peft_model(gpt2(), SupertuningConfig(target_modules=["c_attn"]))  # GPT-2 Conv1D


def test_hooks_on_the_base_layer_warn_once():
    base = MLP()
    base.lin0.register_forward_hook(lambda *args: None)
    model = get_peft_model(base, SupertuningConfig(target_modules=["lin0"], sparsity=0.5))
    with pytest.warns(UserWarning, match="has backward/forward \\(pre\\) hooks set"):
        model(x=torch.randn(2, 10))


def test_adapters_must_agree_on_saving_indices():
    model = get_peft_model(MLP(), SupertuningConfig(target_modules=["lin0"], sparsity=0.5))
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="indices must be saved for all adapters or none"):
        model.add_adapter("other", SupertuningConfig(target_modules=["lin0"], save_precomputed_indices=False))


def test_two_active_adapters_add_up_and_merge_back():
    model = get_peft_model(MLP(), SupertuningConfig(target_modules=["lin0"], sparsity=0.8, init_weights=False))
    model.add_adapter("other", SupertuningConfig(target_modules=["lin0"], sparsity=0.5, r=2, init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.lin0
    original = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(3, 10)
    with torch.no_grad():
        both = model(x=x)
        delta = layer.get_delta_weight("default") + layer.get_delta_weight("other")
        prop.assert_close(both, model.base_model.model.lin1(torch.relu(x @ (original + delta).T + layer.get_base_layer().bias)))
        model.merge_adapter()
        prop.assert_close(model(x=x), both)
        model.unmerge_adapter()
    assert torch.allclose(layer.get_base_layer().weight, original, atol=1e-6)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_keys(tmp_path):
    get_peft_model(llama(), config_for("llama", r=2)).save_pretrained(str(tmp_path))
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    assert weights[prefix + "supertuning_indices"].dtype == torch.int32
    assert weights[prefix + "supertuning_values"].shape == (int(32 * 32 * 0.1),)
    assert weights[prefix + "supertuning_lora_A.weight"].shape == (2, 32)
    assert not any(".default" in key for key in weights)


def test_without_indices_the_support_is_recomputed(tmp_path):
    inputs = lm_inputs()
    with pytest.warns(UserWarning):
        config = config_for("llama", save_precomputed_indices=False)
    model = get_peft_model(llama(), config)
    expected = prop.output_of(model, inputs)
    model.save_pretrained(str(tmp_path))
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert not any("supertuning_indices" in key for key in weights) and weights
    assert not any("supertuning_indices" in key for key in model.state_dict())
    with pytest.warns(UserWarning):
        loaded = PeftModel.from_pretrained(llama(), str(tmp_path))
    prop.assert_close(prop.output_of(loaded, inputs), expected)


# ---------------------------------------------------------------------------------------------- properties
CASES = list(TARGETS)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"sparsity": 0.5, "target_modules": TARGETS[name][:1]},
    fresh=({"init_weights": True, "r": None}, {"init_weights": True, "r": 2}),
    merge=({"r": None}, {"r": 2}),
    restore=({"r": 2},),
    roundtrip=({"r": 2},),
    only_adapter=({"r": 2},),
))


