"""VB-LoRA: config checks, the shared vector bank, layer math by hand, top-k checkpoints, property suite."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import (
    ConfigError,
    PeftModel,
    TargetModulesError,
    VBLoRAConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.tuners.vblora.layer import mix_bank
from peftkit.tuners.vblora.model import index_dtype
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, llama

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = ["llama", "gpt2", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]}


def config_for(name: str, **overrides) -> VBLoRAConfig:
    """A bank whose init is large enough that the adapter visibly moves the logits."""
    kwargs = dict(
        r=4, num_vectors=12, vector_length=16, topk=2, target_modules=TARGETS[name], init_vector_bank_bound=0.5,
        task_type=MODEL_FACTORIES[name].task_type,
    )
    kwargs.update(overrides)
    return VBLoRAConfig(**kwargs)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"num_vectors": 0}, "num_vectors=0"),
        ({"vector_length": -4}, "vector_length=-4"),
        ({"topk": 0}, "topk=0"),
        ({"topk": 5, "num_vectors": 4}, "topk=5 is larger than num_vectors=4"),
        ({"vblora_dropout": 1.5}, "vblora_dropout=1.5"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"init_vector_bank_bound": -1.0}, "init_vector_bank_bound=-1.0"),
        ({"init_logits_std": float("nan")}, "init_logits_std=nan"),
        ({"save_only_topk_weights": "yes"}, "save_only_topk_weights='yes'"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VBLoRAConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    import dataclasses

    ours = {f.name: f.default for f in dataclasses.fields(VBLoRAConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.VBLoRAConfig)}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "peft_type"} == {k: v for k, v in theirs.items() if k != "peft_type"}


def test_default_targets_and_indivisible_features():
    model = get_peft_model(llama(), VBLoRAConfig(vector_length=16, num_vectors=4))
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="`in_features` 8 must be divisible by `vector_length` 3"):
        get_peft_model(_mlp(), VBLoRAConfig(target_modules=["0"], vector_length=3, num_vectors=4))


def test_unsupported_layer_is_a_type_error():
    with pytest.raises(TypeError, match="Embedding is not supported"):
        get_peft_model(llama(), VBLoRAConfig(target_modules=["embed_tokens"], vector_length=16, num_vectors=4))
    with pytest.raises(TargetModulesError):
        get_peft_model(llama(), VBLoRAConfig(target_modules=["embed_tokens"], vector_length=16, num_vectors=4))


# ---------------------------------------------------------------------------------------------- the bank
def test_one_bank_shared_by_every_layer():
    model = get_peft_model(_mlp(), VBLoRAConfig(target_modules=["0", "2"], vector_length=4, num_vectors=6))
    tuner = model.base_model
    bank = tuner.vblora_vector_bank["default"]
    layers = [layer for _, layer in tuner.tuner_layers()]
    assert len(layers) == 2 and all(layer.vblora_vector_bank is tuner.vblora_vector_bank for layer in layers)
    named = [name for name, param in model.named_parameters() if param is bank]
    assert named == ["base_model.model.0.vblora_vector_bank.default"]  # listed once, under the first layer
    assert bank.requires_grad and bank.shape == (6, 4)
    # replacing the tuner's entry is seen by every layer (what peft's tests do)
    torch.nn.init.zeros_(tuner.vblora_vector_bank["default"])
    x = torch.randn(3, 8)
    with model.disable_adapter():
        base = model(x)
    prop.assert_close(model(x), base)
    tuner._init_vblora_vector_bank(tuner.peft_config["default"], "default")
    prop.assert_differs(model(x), base)


def test_second_adapter_has_its_own_bank_and_delete_drops_it():
    model = get_peft_model(_mlp(), VBLoRAConfig(target_modules=["0"], vector_length=4, num_vectors=6))
    model.add_adapter("other", VBLoRAConfig(target_modules=["2"], vector_length=2, num_vectors=3))
    banks = model.base_model.vblora_vector_bank
    assert banks["default"].shape == (6, 4) and banks["other"].shape == (3, 2)
    first, second = model.base_model.model[0], model.base_model.model[2]
    assert first.adapter_names() == ["default"] and second.adapter_names() == ["other"]
    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.0.vblora_vector_bank.other" in trainable
    assert not any(n.endswith(".default") for n in trainable)
    model.merge_adapter(["default", "other"])  # each layer merges only its own adapter
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert "other" not in banks and isinstance(model.base_model.model[2], nn.Linear)


def test_failed_injection_leaves_no_bank():
    model = get_peft_model(_mlp(), VBLoRAConfig(target_modules=["0"], vector_length=4, num_vectors=6))
    with pytest.raises(ValueError):
        model.add_adapter("bad", VBLoRAConfig(target_modules=["0", "2"], vector_length=8, num_vectors=6))
    assert list(model.base_model.vblora_vector_bank) == ["default"]
    assert model.base_model.model[0].adapter_names() == ["default"]


# ---------------------------------------------------------------------------------------------- math
def test_mix_bank_by_hand():
    bank = torch.arange(12.0).reshape(4, 3)
    logits = torch.tensor([[0.0, 5.0, -1.0, 5.0 + torch.log(torch.tensor(3.0)).item()]])
    mixed = mix_bank(logits, bank, topk=2)
    # top-2 are vectors 3 and 1 with softmax weights 3/4 and 1/4
    prop.assert_close(mixed, 0.75 * bank[3] + 0.25 * bank[1])


def test_delta_weight_layout_by_hand():
    model = get_peft_model(_mlp(), VBLoRAConfig(target_modules=["0"], r=2, vector_length=4, num_vectors=5, topk=1))
    layer = model.base_model.model[0]
    bank = model.base_model.vblora_vector_bank["default"]
    with torch.no_grad():
        layer.vblora_logits_A["default"].fill_(0.0)
        layer.vblora_logits_B["default"].fill_(0.0)
        layer.vblora_logits_A["default"][1, 0, 3] = 1.0  # A row 1, columns 0..3 = bank[3]
        layer.vblora_logits_B["default"][2, 0, 4] = 1.0  # B rows 8..11 of column 0 = bank[4]
    a, b = layer._get_lora_matrices("default")
    assert a.shape == (2, 8) and b.shape == (12, 2)
    prop.assert_close(a[1, :4], bank[3])
    prop.assert_close(b[8:12, 0], bank[4])
    prop.assert_close(layer.get_delta_weight("default"), b @ a)
    x = torch.randn(5, 8)
    prop.assert_close(layer(x), layer.base_layer(x) + x @ (b @ a).T)


def test_conv1d_delta_is_transposed():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(Conv1D(8, 4)), VBLoRAConfig(target_modules=["0"], vector_length=4, num_vectors=5))
    layer = model.base_model.model[0]
    assert layer.fan_in_fan_out and layer.get_delta_weight("default").shape == (4, 8)
    x = torch.randn(3, 4)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default"))


def test_index_dtype_thresholds():
    assert [index_dtype(n) for n in (255, 256, 2**15 - 1, 2**15, 2**31)] == [
        torch.uint8, torch.int16, torch.int16, torch.int32, torch.int64,
    ]


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_keys_hold_the_bank_once(tmp_path):
    model = get_peft_model(_mlp(), VBLoRAConfig(target_modules=["0", "2"], vector_length=4, num_vectors=6))
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == [
        "base_model.model.0.vblora_logits_A", "base_model.model.0.vblora_logits_B",
        "base_model.model.2.vblora_logits_A", "base_model.model.2.vblora_logits_B", "base_model.vblora_vector_bank",
    ]


def test_topk_checkpoint_layout_and_reload(tmp_path):
    config = VBLoRAConfig(target_modules=["0", "2"], vector_length=4, num_vectors=6, topk=3, save_only_topk_weights=True)
    model = get_peft_model(_mlp(), config)
    x = torch.randn(4, 8)
    expected = model(x)
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["base_model.model.0.vblora_logits_A_topk_indices"].dtype == torch.uint8
    assert saved["base_model.model.0.vblora_logits_A_topk_indices"].shape == (4, 2, 3)
    assert saved["base_model.model.0.vblora_logits_A_topk_weights"].shape == (4, 2, 2)
    assert not any(key.endswith("vblora_logits_A") for key in saved)
    loaded = PeftModel.from_pretrained(_mlp(), str(tmp_path))
    prop.assert_close(loaded(x), expected)
    loaded.merge_adapter()
    prop.assert_close(loaded(x), expected)
    loaded.unmerge_adapter()
    loaded.train()
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        loaded(x)


def test_state_dict_roundtrip_into_second_adapter():
    model = get_peft_model(_mlp(), VBLoRAConfig(target_modules=["0"], vector_length=4, num_vectors=6))
    state = get_peft_model_state_dict(model)
    model.add_adapter("twin", VBLoRAConfig(target_modules=["0"], vector_length=4, num_vectors=6))
    result = set_peft_model_state_dict(model, state, adapter_name="twin")
    assert not result.missing_keys and not result.unexpected_keys
    banks = model.base_model.vblora_vector_bank
    assert torch.equal(banks["twin"], banks["default"])


def test_bias_vblora_only_trains_and_saves_the_wrapped_biases(tmp_path):
    model = get_peft_model(_mlp(), VBLoRAConfig(target_modules=["0"], vector_length=4, num_vectors=6, bias="vblora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.0.base_layer.bias" in trainable and "base_model.model.2.bias" not in trainable
    assert "base_model.model.0.base_layer.bias" in get_peft_model_state_dict(model)
    with pytest.raises(ConfigError, match="only 1 adapter with bias"):
        model.add_adapter("b", VBLoRAConfig(target_modules=["2"], vector_length=4, num_vectors=6, bias="all"))


def test_low_cpu_mem_usage_load(tmp_path):
    model = get_peft_model(_mlp(), VBLoRAConfig(target_modules=["0", "2"], vector_length=4, num_vectors=6))
    x = torch.randn(2, 8)
    expected = model(x)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    prop.assert_close(loaded(x), expected)


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
    second = config_for(name, r=2, num_vectors=8, topk=3)
    prop.check_adapters_switch(tiny.make_model, tiny.make_inputs(), config_for(name), second)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_lowers_loss(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_training_lowers_loss(tiny.make_model, tiny.make_inputs(), config_for(name), lr=5e-2)


def test_zero_bank_is_a_noop():
    tiny = MODEL_FACTORIES["llama"]
    model = get_peft_model(tiny.make_model(), config_for("llama"))
    torch.nn.init.zeros_(model.base_model.vblora_vector_bank["default"])
    prop.assert_close(prop.output_of(model, tiny.make_inputs()), prop.output_of(tiny.make_model(), tiny.make_inputs()))
