"""C3A: config validation, the block-circulant update (dense == FFT == by hand), layers, property suite."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from peftkit import C3AConfig, ConfigError, PeftConfig, PeftModel, TargetModulesError, get_peft_model
from peftkit import get_peft_model_state_dict
from peftkit.tuners.c3a.layer import block_circular_correlation, circulant_weight
from peftkit.tuners.c3a.model import block_size_at
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

CASES = ["llama", "gpt2", "bert"]  # gpt2: transformers' Conv1D, which peft's C3A refuses (peftkit extension)
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]
}


def config_for(name: str, **overrides) -> C3AConfig:
    """Block size 16 (divides every size of the tiny models), a random (xavier) kernel, the case's task."""
    kwargs = dict(block_size=16, target_modules=TARGETS[name], task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return C3AConfig(**kwargs)


def _single(base: nn.Module, **config):
    model = get_peft_model(nn.Sequential(base), C3AConfig(target_modules=["0"], **config))
    return model, model.base_model.model[0]


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(C3AConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.C3AConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name == "peft_type":
            continue
        assert ours[name].default == their_field.default, name
        if their_field.default_factory is not dataclasses.MISSING:
            assert ours[name].default_factory() == their_field.default_factory(), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 0}, "`block_size` should be a positive integer value but the value passed is 0"),
        ({"block_size": -4}, "`block_size` should be a positive integer"),
        ({"block_size": 2.5}, "`block_size` should be a positive integer"),
        ({"block_size_pattern": {"q": 0}}, r"block_size_pattern\['q'\]"),
        ({"block_size_pattern": ["q"]}, "block_size_pattern=.* is invalid"),
        ({"bias": "lora_only"}, "bias='lora_only' is invalid"),
        ({"init_weights": "orthogonal"}, "Unknown init_weights: 'orthogonal'"),
        ({"init_weights": None}, "Unknown init_weights: None"),
        ({"target_modules": "q.*", "layers_to_transform": [0]}, "`layers_to_transform` cannot be used"),
        ({"target_modules": "q.*", "layers_pattern": "layers"}, "`layers_pattern` cannot be used"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"target_modules": [1]}, "strings"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        C3AConfig(**kwargs)


def test_block_size_must_divide_both_sizes():
    with pytest.raises(ValueError, match="factor of the input size. However, the input size is 6 and the block size"):
        get_peft_model(nn.Sequential(nn.Linear(6, 8)), C3AConfig(block_size=4, target_modules=["0"]))
    with pytest.raises(ValueError, match="factor of the output size. However, the output size is 6"):
        get_peft_model(nn.Sequential(nn.Linear(8, 6)), C3AConfig(block_size=4, target_modules=["0"]))


def test_json_roundtrip_dispatches_to_the_method(tmp_path):
    C3AConfig(block_size=8, block_size_pattern={"q": 4}, init_weights="gaussian", target_modules=["q"]).save_pretrained(
        str(tmp_path)
    )
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is C3AConfig and loaded.block_size_pattern == {"q": 4} and loaded.init_weights == "gaussian"


def test_default_targets():
    model = get_peft_model(llama(), C3AConfig(block_size=16))
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    model = get_peft_model(gpt2(), C3AConfig(block_size=16))
    assert model.peft_config["default"].target_modules == {"mlp.c_proj"}  # peft's table (a Conv1D: ours wraps it)
    assert len(list(model.base_model.tuner_layers())) == 2


def test_unsupported_layer_names_supported_types():
    with pytest.raises(TargetModulesError, match="Embedding, which C3A cannot wrap. Supported: `torch.nn.Linear`"):
        get_peft_model(llama(), C3AConfig(block_size=16, target_modules=["embed_tokens"]))


def test_block_size_pattern_follows_peft_matching():
    config = C3AConfig(block_size=16, block_size_pattern={"q_proj": 8, "model.layers.1.self_attn.v_proj": 4})
    assert block_size_at(config, "model.layers.0.self_attn.q_proj") == 8
    assert block_size_at(config, "model.layers.1.self_attn.v_proj") == 4
    assert block_size_at(config, "model.layers.0.self_attn.v_proj") == 16
    config = C3AConfig(block_size=16, target_modules=["q_proj", "v_proj"], block_size_pattern={"q_proj": 8})
    model = get_peft_model(llama(), config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.c3a_kernel["default"].shape == (4, 4, 8) and layer.block_size["default"] == 8


# ---------------------------------------------------------------------------------------------- math
def test_circulant_block_by_hand():
    kernel = torch.arange(1.0, 4.0).reshape(1, 1, 3)  # w = [1, 2, 3]
    expected = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [2.0, 3.0, 1.0]])  # C[i, j] = w[(j - i) mod 3]
    torch.testing.assert_close(circulant_weight(kernel), expected, atol=0, rtol=0)


def test_single_nonzero_entry_lands_on_one_diagonal_of_one_block():
    kernel = torch.zeros(2, 3, 4)
    kernel[1, 2, 1] = 5.0
    dense = circulant_weight(kernel)
    assert dense.shape == (8, 12)
    expected = torch.zeros(8, 12)
    for i in range(4):
        expected[4 + i, 8 + (i + 1) % 4] = 5.0
    torch.testing.assert_close(dense, expected, atol=0, rtol=0)


@pytest.mark.parametrize("size", [2, 5, 16, 32])
def test_fft_path_equals_dense_matmul(size):
    generator = torch.Generator().manual_seed(0)
    kernel = torch.randn(3, 2, size, generator=generator)
    x = torch.randn(4, 5, 2 * size, generator=generator)
    prop.assert_close(block_circular_correlation(x, kernel), x @ circulant_weight(kernel).T, atol=1e-4)


def test_matches_peft_reference_implementation():
    utils = pytest.importorskip("peft.tuners.c3a.utils")
    generator = torch.Generator().manual_seed(0)
    kernel = torch.randn(2, 3, 8, generator=generator)
    x = torch.randn(5, 24, generator=generator)
    prop.assert_close(circulant_weight(kernel), utils.get_circulant_fast(kernel))
    prop.assert_close(block_circular_correlation(x, kernel), utils.BlockCircularConvolution.apply(x, kernel), atol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])  # the dense and the FFT forward
def test_linear_forward_and_delta(block_size):
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    model, layer = _single(base, block_size=block_size, init_weights="gaussian")
    assert layer.c3a_kernel["default"].shape == (16 // block_size, 32 // block_size, block_size)
    delta = layer.get_delta_weight("default")
    prop.assert_close(delta, circulant_weight(layer.c3a_kernel["default"]) / 32)
    x = torch.randn(3, 32)
    with torch.no_grad():
        prop.assert_close(model(x), base(x) + x @ delta.T)


@pytest.mark.parametrize(
    "init, bound",
    [("xavier_uniform", math.sqrt(3.0) * math.sqrt(2.0 / 48)), (False, math.sqrt(3.0) * math.sqrt(2.0 / 48)),
     ("kaiming_uniform", math.sqrt(1.0 / 32))],
)
def test_uniform_inits_respect_their_bounds(init, bound):
    _, layer = _single(nn.Linear(32, 16), block_size=4, init_weights=init)
    kernel = layer.c3a_kernel["default"]
    assert kernel.abs().max() <= bound and kernel.abs().max() > 0.5 * bound


def test_init_true_is_zero_and_gaussian_is_unit_variance():
    _, layer = _single(nn.Linear(64, 64), block_size=4, init_weights=True)
    assert torch.count_nonzero(layer.c3a_kernel["default"]) == 0
    _, layer = _single(nn.Linear(64, 64), block_size=4, init_weights="gaussian")
    assert 0.8 < float(layer.c3a_kernel["default"].std()) < 1.2


def test_kernel_is_float32_over_bf16_base_and_gradients_flow():
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"))
    layer = next(layer for _, layer in model.base_model.tuner_layers())
    assert layer.c3a_kernel["default"].dtype == torch.float32
    out = model(**lm_inputs())
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.c3a_kernel["default"].grad is not None and layer.c3a_kernel["default"].grad.abs().sum() > 0
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"), autocast_adapter_dtype=False)
    assert next(layer for _, layer in model.base_model.tuner_layers()).c3a_kernel["default"].dtype == torch.bfloat16


def test_conv1d_delta_is_transposed():
    model = get_peft_model(gpt2(), config_for("gpt2", target_modules=["c_attn"]))
    layer = next(layer for _, layer in model.base_model.tuner_layers())
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape == (32, 96)


def test_two_active_adapters_add_their_updates():
    model = get_peft_model(llama(), config_for("llama", target_modules=["q_proj", "down_proj"]))
    model.add_adapter("other", config_for("llama", target_modules=["q_proj", "down_proj"], block_size=8))
    model.base_model.set_adapter(["default", "other"])
    both = prop.output_of(model, lm_inputs())
    model.merge_adapter()
    prop.assert_close(prop.output_of(model, lm_inputs()), both)
    model.unmerge_adapter()
    model.base_model.set_adapter("default")
    prop.assert_differs(both, prop.output_of(model, lm_inputs()))


def test_c3a_only_bias_trains_and_saves_target_biases():
    model = get_peft_model(gpt2(), config_for("gpt2", target_modules=["c_attn"], bias="c3a_only"))
    biases = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert biases == [f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)]
    saved = get_peft_model_state_dict(model)
    assert {key for key in saved if key.endswith("bias")} == set(biases)
    with pytest.raises(ConfigError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", config_for("gpt2", target_modules=["c_attn"], bias="all"))


def test_low_cpu_mem_usage_load(tmp_path):
    model = get_peft_model(llama(), config_for("llama"))
    expected = prop.output_of(model, lm_inputs())
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    prop.assert_close(prop.output_of(loaded, lm_inputs()), expected, atol=0)


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
    prop.check_save_load_roundtrip(case.make_model, case.make_inputs(), config_for(name), tmp_path)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_only_adapter_params_train(name):
    case = MODEL_FACTORIES[name]
    prop.check_only_adapter_params_train(case.make_model, case.make_inputs(), config_for(name))


def test_adapters_switch():
    other = config_for("llama", target_modules=["q_proj"], block_size=8)
    prop.check_adapters_switch(llama, lm_inputs(), config_for("llama"), other)


def test_training_lowers_loss():
    prop.check_training_lowers_loss(llama, lm_inputs(), config_for("llama", init_weights=True), lr=0.05)


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_with_zero_init_is_noop(name):
    case = MODEL_FACTORIES[name]
    prop.fresh_adapter_is_noop(case.make_model, case.make_inputs(), config_for(name, init_weights=True))
