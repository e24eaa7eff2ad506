"""FourierFT: config checks, frequency locations, layer math by hand, both forward paths, property suite."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import ConfigError, FourierFTConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peftkit.tuners.fourierft.layer import FourierFTLayer, random_locations
from peftkit.tuners.fourierft.model import fourierft_pattern_value
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, llama

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = ["llama", "gpt2", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]}


def config_for(name: str, **overrides) -> FourierFTConfig:
    kwargs = dict(n_frequency=24, scaling=40.0, target_modules=TARGETS[name], task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return FourierFTConfig(**kwargs)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


def _layers(model) -> list[FourierFTLayer]:
    return [layer for _, layer in model.base_model.tuner_layers()]


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_frequency": 0}, "n_frequency=0"),
        ({"n_frequency": 2.5}, "n_frequency=2.5"),
        ({"n_frequency_pattern": {"q_proj": -1}}, "n_frequency_pattern"),
        ({"scaling": float("inf")}, "scaling=inf"),
        ({"random_loc_seed": "seed"}, "random_loc_seed='seed'"),
        ({"init_weights": "yes"}, "init_weights='yes'"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out=1"),
        ({"bias": "lora"}, "bias='lora'"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FourierFTConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f.default for f in dataclasses.fields(FourierFTConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.FourierFTConfig)}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "peft_type"} == {k: v for k, v in theirs.items() if k != "peft_type"}
    assert FourierFTConfig().init_weights is False  # peft's default: a random, non-identity adapter


def test_default_targets_match_peft():
    peft = pytest.importorskip("peft")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING as theirs

    from peftkit.tuners.fourierft.constants import FOURIERFT_TARGET_MODULES_BY_MODEL_TYPE as ours

    assert peft is not None and ours == theirs
    model = get_peft_model(llama(), FourierFTConfig(n_frequency=8))
    assert sorted(model.base_model.targeted_module_names)[0].endswith("q_proj")


def test_n_frequency_above_layer_size_is_refused():
    with pytest.raises(ConfigError, match="less than or equal to the product"):
        get_peft_model(_mlp(), FourierFTConfig(n_frequency=97, target_modules=["0"]))  # 8 * 12 = 96
    get_peft_model(_mlp(), FourierFTConfig(n_frequency=96, target_modules=["0"]))


def test_unsupported_layer_is_a_type_error():
    model = nn.Sequential(nn.Conv2d(2, 2, 3))
    with pytest.raises(TypeError, match="FourierFT"):
        get_peft_model(model, FourierFTConfig(n_frequency=4, target_modules=["0"]))


def test_fan_in_fan_out_is_corrected_with_peft_warning():
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        model = get_peft_model(_mlp(), FourierFTConfig(n_frequency=4, target_modules=["0"], fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is False
    gpt2 = MODEL_FACTORIES["gpt2"].make_model()
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        model = get_peft_model(gpt2, FourierFTConfig(n_frequency=4, target_modules=["c_attn"]))
    assert model.peft_config["default"].fan_in_fan_out is True


def test_n_frequency_pattern_follows_peft_rule():
    patterns = {"lin0": 5, "layers.1.q_proj": 7}
    assert fourierft_pattern_value(patterns, "lin0", 10) == 5  # exact name
    assert fourierft_pattern_value(patterns, "model.lin0", 10) == 5  # dotted suffix
    assert fourierft_pattern_value(patterns, "model.layers.1.q_proj", 10) == 7
    assert fourierft_pattern_value(patterns, "model.layers.0.q_proj", 10) == 10
    model = get_peft_model(llama(), FourierFTConfig(n_frequency=8, n_frequency_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj"]))
    sizes = {name.rsplit(".", 1)[1]: layer.fourierft_spectrum["default"].numel() for name, layer in model.base_model.tuner_layers()}
    assert sizes == {"q_proj": 8, "v_proj": 3}


# ---------------------------------------------------------------------------------------------- locations and math
def test_locations_are_peft_draw_distinct_and_in_range():
    indices = random_locations(6, 10, 20, 777)
    flat = torch.randperm(60, generator=torch.Generator().manual_seed(777))[:20]
    assert torch.equal(indices, torch.stack([flat // 10, flat % 10]))
    assert len({(int(r), int(c)) for r, c in indices.T}) == 20
    assert int(indices[0].max()) < 6 and int(indices[1].max()) < 10
    indices[0, 0] = -1  # a copy: the cache is not changed
    assert int(random_locations(6, 10, 20, 777)[0, 0]) >= 0
    assert not torch.equal(random_locations(6, 10, 20, 778), random_locations(6, 10, 20, 777))


def test_delta_weight_by_hand():
    """A single coefficient s at (u, v) gives s * scaling / (out * in) * cos(2 pi (a u / out + b v / in))."""
    model = get_peft_model(_mlp(), FourierFTConfig(n_frequency=1, scaling=3.0, target_modules=["0"]))
    layer = _layers(model)[0]
    with torch.no_grad():
        layer.fourierft_spectrum["default"].fill_(2.0)
    u, v = (int(t) for t in layer.indices["default"][:, 0])
    a = torch.arange(12.0)[:, None]
    b = torch.arange(8.0)[None, :]
    expected = 2.0 * 3.0 / 96 * torch.cos(2 * torch.pi * (a * u / 12 + b * v / 8))
    prop.assert_close(layer.get_delta_weight("default"), expected)
    x = torch.randn(5, 8)
    for mode in ("spectral", "materialized"):
        layer.delta_mode = mode
        prop.assert_close(layer(x), layer.base_layer(x) + x @ expected.T)


@pytest.mark.parametrize("shape", [(8, 12), (7, 5), (16, 3)])
def test_spectral_path_equals_materialized_with_gradients(shape):
    in_features, out_features = shape
    torch.manual_seed(3)
    model = get_peft_model(nn.Sequential(nn.Linear(in_features, out_features)), FourierFTConfig(n_frequency=11, target_modules=["0"]))
    layer = _layers(model)[0]
    x = torch.randn(2, 3, in_features, requires_grad=True)
    results = {}
    for mode in ("spectral", "materialized"):
        layer.delta_mode = mode
        out = layer(x)
        grads = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape)).sum(), [x, layer.fourierft_spectrum["default"]])
        results[mode] = (out.detach(), *grads)
    for spectral, materialized in zip(results["spectral"], results["materialized"]):
        prop.assert_close(spectral, materialized, atol=1e-5 * (1 + float(materialized.abs().max())))  # float32 rounding


def test_auto_picks_spectral_for_large_layers_and_dense_for_tiny():
    big = get_peft_model(nn.Sequential(nn.Linear(512, 512)), FourierFTConfig(n_frequency=64, target_modules=["0"]))
    small = get_peft_model(nn.Sequential(nn.Linear(4, 4)), FourierFTConfig(n_frequency=4, target_modules=["0"]))
    assert _layers(big)[0]._path(torch.zeros(64, 512), "default") == "spectral"
    assert _layers(small)[0]._path(torch.zeros(64, 4), "default") == "materialized"
    _layers(small)[0].delta_mode = "fft"
    with pytest.raises(ValueError, match="delta_mode"):
        _layers(small)[0](torch.zeros(1, 4))


def test_conv1d_delta_is_transposed():
    model = get_peft_model(MODEL_FACTORIES["gpt2"].make_model(), config_for("gpt2"))
    layer = next(layer for layer in _layers(model) if isinstance(layer.get_base_layer(), Conv1D))
    x = torch.randn(3, layer.in_features)
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape
    for mode in ("spectral", "materialized"):
        layer.delta_mode = mode
        prop.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default"))


def test_init_weights_true_is_a_noop_and_false_is_standard_normal():
    tiny = MODEL_FACTORIES["llama"]
    prop.fresh_adapter_is_noop(tiny.make_model, tiny.make_inputs(), config_for("llama", init_weights=True))
    model = get_peft_model(nn.Sequential(nn.Linear(64, 64)), FourierFTConfig(n_frequency=4000, target_modules=["0"]))
    spectrum = _layers(model)[0].fourierft_spectrum["default"]
    assert abs(float(spectrum.mean())) < 0.1 and abs(float(spectrum.std()) - 1) < 0.1


def test_checkpoint_holds_only_the_spectrum(tmp_path):
    model = get_peft_model(llama(), config_for("llama"))
    state = get_peft_model_state_dict(model)
    assert state and all(key.endswith(".fourierft_spectrum") for key in state)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.fourierft_spectrum"].shape == (24,)


def test_indices_follow_the_device_cache_and_delete():
    model = get_peft_model(_mlp(), FourierFTConfig(n_frequency=4, target_modules=["0"]))
    model.add_adapter("other", FourierFTConfig(n_frequency=6, random_loc_seed=1, target_modules=["0"]))
    layer = _layers(model)[0]
    first = layer.indices_on("other", torch.device("cpu"))
    assert layer.indices_on("other", torch.device("cpu")) is first
    model.delete_adapter("other")
    assert "other" not in layer.indices and not any(key[0] == "other" for key in layer._indices_on)


def test_bias_all_trains_and_saves_biases(tmp_path):
    model = get_peft_model(_mlp(), FourierFTConfig(n_frequency=4, target_modules=["0"], bias="fourier_only"))
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.0.base_layer.bias", "base_model.model.0.fourierft_spectrum.default"]
    assert "base_model.model.0.base_layer.bias" in get_peft_model_state_dict(model)  # where peft saves it
    with pytest.raises(ConfigError, match="only 1 adapter with bias"):
        model.add_adapter("other", FourierFTConfig(n_frequency=4, target_modules=["2"], bias="all"))


def test_half_precision_base_computes_delta_in_fp32():
    base = _mlp().to(torch.bfloat16)
    model = get_peft_model(base, FourierFTConfig(n_frequency=8, target_modules=["0"]))
    layer = _layers(model)[0]
    assert layer.fourierft_spectrum["default"].dtype == torch.float32
    out = model(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


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
    second = config_for(name, n_frequency=10, random_loc_seed=5)
    prop.check_adapters_switch(tiny.make_model, tiny.make_inputs(), config_for(name), second)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_lowers_loss(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_training_lowers_loss(tiny.make_model, tiny.make_inputs(), config_for(name, init_weights=True), lr=5e-2)


def test_low_cpu_mem_usage_load(tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    model = get_peft_model(tiny.make_model(), config_for("llama"))
    expected = prop.output_of(model, tiny.make_inputs())
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny.make_model(), str(tmp_path), low_cpu_mem_usage=True)
    prop.assert_close(prop.output_of(loaded, tiny.make_inputs()), expected)
