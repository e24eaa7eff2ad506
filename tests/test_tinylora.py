"""TinyLoRA: config validation, SVD factors and projections, weight tying, layers, property suite."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

from peftkit import ConfigError, PeftConfig, PeftModel, TargetModulesError, TinyLoraConfig, get_peft_model
from peftkit import get_peft_model_state_dict
from peftkit.tuners.tinylora.layer import projection
from peftkit.tuners.tinylora.model import group_of
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

CASES = ["llama", "gpt2", "bert"]
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]
}


def config_for(name: str, **overrides) -> TinyLoraConfig:
    """A visible adapter: v drawn from U(-0.5, 0.5), small u, the case's targets and task."""
    kwargs = dict(r=2, u=8, target_modules=TARGETS[name], init_weights="uniform", init_v_bound=0.5)
    kwargs["task_type"] = MODEL_FACTORIES[name].task_type
    kwargs.update(overrides)
    return TinyLoraConfig(**kwargs)


def _layers(model) -> dict:
    return dict(model.base_model.tuner_layers())


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f.default for f in dataclasses.fields(TinyLoraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.TinyLoraConfig)}
    assert set(ours) == set(theirs)
    for name, default in theirs.items():
        if name != "peft_type":  # peft sets it in __post_init__; ours is the field default
            assert ours[name] == default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "`r` should be a positive integer value but the value passed is 0"),
        ({"r": -3}, "`r` should be a positive integer"),
        ({"r": 1.5}, "`r` should be a positive integer"),
        ({"u": 0}, "`u` should be a positive integer value but the value passed is 0"),
        ({"weight_tying": 1.5}, "`weight_tying` should be a float between 0.0 and 1.0"),
        ({"weight_tying": -0.1}, "`weight_tying` should be a float between 0.0 and 1.0"),
        ({"weight_tying": math.nan}, "weight_tying=nan"),
        ({"tinylora_dropout": 1.0}, r"tinylora_dropout=1.0 .*\[0, 1\)"),
        ({"init_v_bound": math.inf}, "init_v_bound=inf"),
        ({"bias": "lora_only"}, "bias='lora_only' is invalid"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian'"),
        ({"init_weights": 1}, "init_weights=1"),
        ({"projection_seed": "42"}, "projection_seed='42'"),
        ({"save_projection": "yes"}, "save_projection='yes'"),
        ({"layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
        ({"target_modules": [1]}, "strings"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TinyLoraConfig(**kwargs)


def test_bad_values_are_value_errors_as_in_peft():
    with pytest.raises(ValueError):
        TinyLoraConfig(u=-1)


def test_save_projection_false_warns_as_peft():
    with pytest.warns(UserWarning, match="Specified to not save projection tensors P"):
        TinyLoraConfig(save_projection=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TinyLoraConfig(save_projection=True)


def test_json_roundtrip_dispatches_to_the_method(tmp_path):
    config = TinyLoraConfig(r=3, u=5, weight_tying=0.25, init_weights="uniform", target_modules=["q"])
    config.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is TinyLoraConfig
    assert (loaded.r, loaded.u, loaded.weight_tying, loaded.init_weights) == (3, 5, 0.25, "uniform")


def test_default_targets_are_peft_lora_table():
    model = get_peft_model(llama(), TinyLoraConfig())
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}


def test_unsupported_layer_names_supported_types():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(TargetModulesError, match="Conv2d, which TinyLoRA cannot wrap. Supported: `torch.nn.Linear`"):
        get_peft_model(model, TinyLoraConfig(target_modules=["0"]))


# ---------------------------------------------------------------------------------------------- layer math
def _single(base: nn.Module, **config):
    model = get_peft_model(nn.Sequential(base), TinyLoraConfig(target_modules=["0"], **config))
    return model, model.base_model.model[0]


def test_factors_are_the_truncated_svd_split_evenly():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    _, layer = _single(base, r=3, u=4)
    A, B = layer.tinylora_A["default"], layer.tinylora_B["default"]
    assert A.shape == (3, 7) and B.shape == (5, 3)
    U, S, Vh = torch.linalg.svd(base.weight.detach())
    prop.assert_close(B @ A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])
    # S is split evenly: both factors carry sqrt(S) (row norms of A = column norms of B)
    prop.assert_close(A.norm(dim=1), B.norm(dim=0))


def test_rank_is_capped_by_the_weight_shape():
    _, layer = _single(nn.Linear(3, 2), r=8, u=4)
    assert layer.r["default"] == 2 and layer.tinylora_P["default"].shape == (4, 2, 2)


def test_linear_forward_and_delta_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    model, layer = _single(base, r=2, u=3, init_weights="uniform", init_v_bound=1.0)
    v, P = layer.vector("default"), layer.tinylora_P["default"]
    R = sum(v[i] * P[i] for i in range(3))
    delta = layer.tinylora_B["default"] @ R @ layer.tinylora_A["default"]
    prop.assert_close(layer.get_delta_weight("default"), delta)
    x = torch.randn(5, 6)
    with torch.no_grad():
        prop.assert_close(model(x), base(x) + x @ delta.T)


def test_projection_seeds_follow_the_target_number():
    model = get_peft_model(llama(), TinyLoraConfig(target_modules=["q_proj", "v_proj"], u=4, projection_seed=7))
    layers = list(_layers(model).values())
    assert [layer._layer_idx for layer in layers] == [0, 1, 2, 3]
    for number, layer in enumerate(layers):
        torch.testing.assert_close(layer.tinylora_P["default"], projection(4, 2, 7 + number), atol=0, rtol=0)
    assert not torch.equal(layers[0].tinylora_P["default"], layers[1].tinylora_P["default"])


@pytest.mark.parametrize(
    "n, tying, expected",
    [
        (4, 0.0, [0, 1, 2, 3]), (4, 1.0, [0, 0, 0, 0]), (4, 0.5, [0, 0, 1, 1]),
        (5, 0.5, [0, 0, 1, 1, 1]), (3, 0.5, [0, 1, 1]),
    ],
)
def test_groups_follow_peft_rounding(n, tying, expected):
    assert [group_of(i, n, tying) for i in range(n)] == expected


@pytest.mark.parametrize("tying, groups", [(0.0, 4), (0.5, 2), (1.0, 1)])
def test_weight_tying_shares_one_parameter_per_group(tying, groups):
    model = get_peft_model(llama(), TinyLoraConfig(target_modules=["q_proj", "v_proj"], u=5, weight_tying=tying))
    assert len(model.base_model.tinylora_v["default"]) == groups
    vectors = {id(layer.vector("default")) for layer in _layers(model).values()}
    assert len(vectors) == groups
    assert model.get_nb_trainable_parameters()[0] == 5 * groups
    assert sorted(k for k in get_peft_model_state_dict(model) if "tinylora_v" in k) == [
        f"base_model.tinylora_v.{g}" for g in range(groups)
    ]


def test_tied_vector_gets_gradients_from_every_layer():
    model = get_peft_model(llama(), TinyLoraConfig(target_modules=["q_proj", "v_proj"], u=5, weight_tying=1.0))
    model.base_model._init_tinylora_v(model.peft_config["default"], "default")
    model(**lm_inputs()).loss.backward()
    (vector,) = model.base_model.tinylora_v["default"].values()
    assert vector.grad is not None and vector.grad.abs().sum() > 0


def test_conv1d_delta_is_transposed_and_merges():
    model = get_peft_model(gpt2(), config_for("gpt2", target_modules=["c_attn"]))
    layer = next(iter(_layers(model).values()))
    assert layer.fan_in_fan_out and layer.in_features == 32 and layer.out_features == 96
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape == (32, 96)
    prop.check_merge_equals_unmerged(gpt2, lm_inputs(), config_for("gpt2", target_modules=["c_attn"]))


def test_conv1d_and_linear_layout_warnings():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        get_peft_model(gpt2(), TinyLoraConfig(target_modules=["c_attn"]))
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        get_peft_model(llama(), TinyLoraConfig(target_modules=["q_proj"], fan_in_fan_out=True))


def test_embedding_forward_by_hand():
    torch.manual_seed(0)
    base = nn.Embedding(10, 6)
    model, layer = _single(base, r=2, u=3, init_weights="uniform", init_v_bound=1.0)
    assert (layer.in_features, layer.out_features) == (10, 6)
    ids = torch.tensor([[1, 4, 9]])
    delta = layer.get_delta_weight("default").detach()
    original = base.weight.detach().clone()
    assert delta.shape == (10, 6)
    with torch.no_grad():
        expected = base(ids) + delta[ids]
        prop.assert_close(model(ids), expected)
    model.merge_adapter()
    prop.assert_close(base.weight.detach(), original + delta)  # the table itself holds the update
    with torch.no_grad():
        prop.assert_close(model(ids), expected)


def test_quantized_bases_are_refused():
    """peft's TinyLoRA takes the SVD of dense weights only; a quantized base is refused clearly."""
    from peftkit.quantization import QuantizationConfig, quantize_model

    model = quantize_model(llama(), QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    with pytest.raises(TargetModulesError, match="TinyLoRA cannot wrap"):
        get_peft_model(model, TinyLoraConfig(target_modules=["q_proj"]))


# ---------------------------------------------------------------------------------------------- adapters and state
def test_save_projection_false_regenerates_p(tmp_path):
    with pytest.warns(UserWarning):
        config = config_for("llama", save_projection=False)
    model = get_peft_model(llama(), config)
    expected = prop.output_of(model, lm_inputs())
    assert not any(".tinylora_P" in k for k in get_peft_model_state_dict(model))
    assert not any("tinylora_P" in k for k in model.state_dict())
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path))
    prop.assert_close(prop.output_of(loaded, lm_inputs()), expected, atol=0)


def test_mixed_save_projection_is_refused():
    model = get_peft_model(llama(), TinyLoraConfig(target_modules=["q_proj"]))
    with pytest.warns(UserWarning):
        other = TinyLoraConfig(target_modules=["q_proj"], save_projection=False)
    with pytest.raises(TypeError, match="must be saved for all adapters or none"):
        model.add_adapter("other", other)
    assert list(model.peft_config) == ["default"] and "other" not in model.base_model.tinylora_v


def test_second_adapter_with_bias_is_refused():
    model = get_peft_model(llama(), TinyLoraConfig(target_modules=["q_proj"], bias="all"))
    with pytest.raises(ConfigError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", TinyLoraConfig(target_modules=["q_proj"], bias="tinylora_only"))


def test_tinylora_only_bias_trains_and_saves_target_biases():
    model = get_peft_model(gpt2(), config_for("gpt2", target_modules=["c_attn"], bias="tinylora_only"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert [n for n in trainable if n.endswith("bias")] == [
        f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)
    ]
    saved = get_peft_model_state_dict(model)
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in saved
    assert not any(k.endswith("c_proj.bias") for k in saved)


def test_delete_adapter_drops_its_vectors_and_numbering():
    model = get_peft_model(llama(), config_for("llama"))
    model.add_adapter("other", config_for("llama", target_modules=["q_proj"]))
    assert set(model.base_model.tinylora_v) == {"default", "other"}
    model.delete_adapter("other")
    assert set(model.base_model.tinylora_v) == {"default"}
    assert "other" not in model.base_model._target_key_to_idx
    assert all("other" not in layer.tinylora_A for layer in _layers(model).values())


def test_second_adapter_numbers_its_own_targets():
    model = get_peft_model(llama(), config_for("llama", target_modules=["v_proj"], weight_tying=0.0))
    model.add_adapter("other", config_for("llama", target_modules=["q_proj", "v_proj"], weight_tying=0.0))
    layers = _layers(model)
    v1 = layers["model.layers.1.self_attn.v_proj"]
    assert v1._tinylora_v_key == {"default": "1", "other": "3"}
    assert v1._layer_idx == 1  # the projection seed offset stays the one of its first adapter


def test_failed_add_adapter_leaves_no_vectors():
    model = get_peft_model(llama(), config_for("llama", target_modules=["q_proj"]))
    with pytest.raises(TargetModulesError):
        model.add_adapter("bad", TinyLoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert set(model.base_model.tinylora_v) == {"default"} and list(model.peft_config) == ["default"]


def test_low_cpu_mem_usage_load(tmp_path):
    model = get_peft_model(llama(), config_for("llama", weight_tying=0.5))
    expected = prop.output_of(model, lm_inputs())
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    prop.assert_close(prop.output_of(loaded, lm_inputs()), expected, atol=0)
    shared = {id(layer.vector("default")) for layer in _layers(loaded).values()}
    assert shared == {id(v) for v in loaded.base_model.tinylora_v["default"].values()}


@pytest.mark.parametrize("autocast, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_adapter_dtype_over_bf16_base(autocast, dtype):
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"), autocast_adapter_dtype=autocast)
    layer = next(iter(_layers(model).values()))
    tensors = (layer.vector("default"), layer.tinylora_A["default"], layer.tinylora_P["default"])
    assert {tensor.dtype for tensor in tensors} == {dtype}
    assert torch.isfinite(model(**lm_inputs()).logits).all()


# ---------------------------------------------------------------------------------------------- property suite
@pytest.mark.parametrize("name", CASES)
def test_merge_equals_unmerged(name):
    case = MODEL_FACTORIES[name]
    prop.check_merge_equals_unmerged(case.make_model, case.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_merge_unmerge_restores_weights(name):
    prop.check_merge_unmerge_restores_weights(MODEL_FACTORIES[name].make_model, config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_disable_gives_base(name):
    case = MODEL_FACTORIES[name]
    prop.check_disable_gives_base(case.make_model, case.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_save_load_roundtrip(name, tmp_path):
    case = MODEL_FACTORIES[name]
    prop.check_save_load_roundtrip(case.make_model, case.make_inputs(), config_for(name, weight_tying=0.5), tmp_path)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_only_adapter_params_train(name):
    case = MODEL_FACTORIES[name]
    prop.check_only_adapter_params_train(case.make_model, case.make_inputs(), config_for(name))


def test_adapters_switch():
    prop.check_adapters_switch(llama, lm_inputs(), config_for("llama"), config_for("llama", target_modules=["q_proj"]))


def test_training_lowers_loss():
    prop.check_training_lowers_loss(llama, lm_inputs(), config_for("llama", init_weights=True), lr=0.3)


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_is_noop(name):
    case = MODEL_FACTORIES[name]
    prop.fresh_adapter_is_noop(case.make_model, case.make_inputs(), config_for(name, init_weights=True))


def test_embedding_target_properties(tmp_path):
    config = config_for("llama", target_modules=["embed_tokens", "q_proj"])
    prop.check_merge_equals_unmerged(llama, lm_inputs(), config)
    prop.check_save_load_roundtrip(llama, lm_inputs(), config, tmp_path)
