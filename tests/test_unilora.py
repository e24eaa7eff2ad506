"""Uni-LoRA: config checks, the shared theta_d, balanced index assignment, layer math, property suite."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import ConfigError, PeftModel, UniLoraConfig, get_peft_model
from peftkit.tuners.unilora.model import generate_index
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, llama

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = ["llama", "gpt2", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]}


def config_for(name: str, **overrides) -> UniLoraConfig:
    """theta_d ~ N(0, 1) (init_weights=False): the adapter visibly moves the logits."""
    kwargs = dict(r=2, theta_d_length=64, target_modules=TARGETS[name], init_weights=False,
                  task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return UniLoraConfig(**kwargs)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"theta_d_length": 0}, "theta_d_length=0"),
        ({"unilora_dropout": 1.5}, "unilora_dropout=1.5"),
        ({"init_theta_d_bound": 0.0}, "init_theta_d_bound=0.0"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"proj_seed": -1}, "proj_seed=-1"),
        ({"save_indices": 1}, "save_indices=1"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": ".*q", "layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        UniLoraConfig(**kwargs)
    UniLoraConfig(unilora_dropout=1.0)  # peft's range is closed


def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f.default for f in dataclasses.fields(UniLoraConfig) if f.name != "peft_type"}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.UniLoraConfig) if f.name != "peft_type"}
    assert ours == theirs


def test_default_targets_are_peft_lora_table():
    pytest.importorskip("peft")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_UNILORA_TARGET_MODULES_MAPPING

    from peftkit.tuners.unilora import UniLoraModel

    assert UniLoraModel.default_target_modules == TRANSFORMERS_MODELS_TO_UNILORA_TARGET_MODULES_MAPPING
    model = get_peft_model(llama(), UniLoraConfig(theta_d_length=16))
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}


def test_unsupported_layer_is_a_type_error():
    with pytest.raises(TypeError, match="Embedding is not supported"):
        get_peft_model(llama(), UniLoraConfig(target_modules=["embed_tokens"]))


# ---------------------------------------------------------------------------------------------- indices
@pytest.mark.parametrize("count, length", [(100, 7), (5, 9), (64, 16)])
def test_generate_index_is_balanced_and_seeded(count, length):
    indices = generate_index(count, length, 3)
    uses = torch.bincount(indices, minlength=length)
    assert indices.numel() == count and int(uses.max() - uses.min()) <= 1
    assert torch.equal(indices, generate_index(count, length, 3))
    assert count < 10 or not torch.equal(indices, generate_index(count, length, 4))


def test_indices_cover_the_model_and_scales_are_inverse_sqrt_uses():
    model = get_peft_model(_mlp(), UniLoraConfig(target_modules=["0", "2"], r=2, theta_d_length=10))
    first, second = model.base_model.model[0], model.base_model.model[2]
    assert first.unilora_theta_d is second.unilora_theta_d is model.base_model.unilora_theta_d
    pieces = [first.unilora_indices_A, first.unilora_indices_B, second.unilora_indices_A, second.unilora_indices_B]
    flat = torch.cat([p["default"].flatten() for p in pieces])
    assert flat.numel() == 2 * 8 + 12 * 2 + 2 * 12 + 4 * 2
    assert torch.equal(flat, generate_index(flat.numel(), 10, 42))  # dealt A then B, layer after layer
    uses = torch.bincount(flat, minlength=10).float()
    prop.assert_close(first.unilora_scales_A["default"], uses[first.unilora_indices_A["default"]].rsqrt())


def test_layer_math_by_hand():
    model = get_peft_model(_mlp(), UniLoraConfig(target_modules=["0"], r=2, theta_d_length=10, init_weights=False))
    layer = model.base_model.model[0]
    theta = model.base_model.unilora_theta_d["default"]
    a = theta[layer.unilora_indices_A["default"]] * layer.unilora_scales_A["default"]
    b = theta[layer.unilora_indices_B["default"]] * layer.unilora_scales_B["default"]
    prop.assert_close(layer.get_delta_weight("default"), b @ a)
    x = torch.randn(3, 8)
    prop.assert_close(layer(x), layer.base_layer(x) + x @ (b @ a).T)


def test_conv1d_delta_is_transposed():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(Conv1D(8, 4)), UniLoraConfig(target_modules=["0"], theta_d_length=9, init_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(3, 4)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default"))


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("save_indices", [False, True])
def test_checkpoint_keys(save_indices, tmp_path):
    config = UniLoraConfig(target_modules=["0", "2"], theta_d_length=10, init_weights=False, save_indices=save_indices)
    model = get_peft_model(_mlp(), config)
    x = torch.randn(2, 8)
    expected = model(x)
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    per_layer = [f"base_model.model.{i}.unilora_{n}" for i in (0, 2) for n in ("indices_A", "indices_B", "scales_A", "scales_B")]
    assert keys == sorted(["base_model.unilora_theta_d", *(per_layer if save_indices else [])])
    loaded = PeftModel.from_pretrained(_mlp(), str(tmp_path))
    prop.assert_close(loaded(x), expected)


def test_saved_indices_win_over_the_seed(tmp_path):
    config = UniLoraConfig(target_modules=["0"], theta_d_length=10, init_weights=False, save_indices=True)
    model = get_peft_model(_mlp(), config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.unilora_indices_A["default"].copy_(layer.unilora_indices_A["default"].flip(0))
    x = torch.randn(2, 8)
    expected = model(x)
    model.save_pretrained(str(tmp_path))
    prop.assert_close(PeftModel.from_pretrained(_mlp(), str(tmp_path))(x), expected)


def test_two_adapters_each_their_own_theta_and_delete():
    model = get_peft_model(_mlp(), UniLoraConfig(target_modules=["0"], theta_d_length=10))
    model.add_adapter("other", UniLoraConfig(target_modules=["0", "2"], theta_d_length=7, proj_seed=1))
    thetas = model.base_model.unilora_theta_d
    assert thetas["default"].shape == (10,) and thetas["other"].shape == (7,)
    assert model.base_model.model[2].adapter_names() == ["other"]
    model.delete_adapter("other")
    assert "other" not in thetas and isinstance(model.base_model.model[2], nn.Linear)


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", CASES)
def test_merge_equals_unmerged(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_merge_unmerge_restores_weights(name):
    prop.check_merge_unmerge_restores_weights(MODEL_FACTORIES[name].make_model, config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_disable_gives_base(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_disable_gives_base(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_save_load_roundtrip(name, tmp_path):
    tiny = MODEL_FACTORIES[name]
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config_for(name), tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_only_adapter_params_train(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_only_adapter_params_train(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_adapters_switch(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_adapters_switch(tiny.make_model, tiny.make_inputs(), config_for(name), config_for(name, proj_seed=3))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_lowers_loss(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_training_lowers_loss(tiny.make_model, tiny.make_inputs(), config_for(name), lr=5e-2)


def test_zero_theta_is_a_noop():
    tiny = MODEL_FACTORIES["llama"]
    model = get_peft_model(tiny.make_model(), config_for("llama"))
    torch.nn.init.zeros_(model.base_model.unilora_theta_d["default"])
    prop.assert_close(prop.output_of(model, tiny.make_inputs()), prop.output_of(tiny.make_model(), tiny.make_inputs()))
