"""WaveFT: config checks, the inverse DWT by hand, both forward paths, proportional budgets, property suite."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import ConfigError, PeftModel, WaveFTConfig, get_peft_model, get_peft_model_state_dict
from peftkit.tuners.waveft.filters import RECONSTRUCTION_LOWPASS
from peftkit.tuners.waveft.layer import WaveFTLayer
from peftkit.tuners.waveft.wavelets import Axis, analyze, synthesis_filters, synthesize
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, llama

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = ["llama", "gpt2", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]}


def config_for(name: str, **overrides) -> WaveFTConfig:
    """Random coefficients large enough that the adapter visibly moves the logits."""
    kwargs = dict(
        n_frequency=24, scaling=100.0, init_weights=False, target_modules=TARGETS[name], task_type=MODEL_FACTORIES[name].task_type
    )
    kwargs.update(overrides)
    return WaveFTConfig(**kwargs)


def _mlp(in_features: int = 8, hidden: int = 12) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def _layers(model) -> list[WaveFTLayer]:
    return [layer for _, layer in model.base_model.tuner_layers()]


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_frequency": 0}, "n_frequency=0"),
        ({"n_frequency": True}, "n_frequency=True"),
        ({"n_frequency_pattern": {"q_proj": 0}}, "n_frequency_pattern"),
        ({"scaling": float("nan")}, "scaling=nan"),
        ({"wavelet_family": "haar"}, "Wavelet family haar not supported"),
        ({"wavelet_family": "bior1.3"}, "Supported wavelet families are"),
        ({"use_idwt": "no"}, "use_idwt='no'"),
        ({"proportional_parameters": 1}, "proportional_parameters=1"),
        ({"random_loc_seed": 1.5}, "random_loc_seed=1.5"),
        ({"init_weights": None}, "init_weights=None"),
        ({"bias": "some"}, "bias='some'"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        WaveFTConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_fields_defaults_and_families_match_peft():
    peft = pytest.importorskip("peft")
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS as theirs

    from peftkit.tuners.waveft.wavelets import WAVELET_REDUCTIONS as ours

    fields = {f.name: f.default for f in dataclasses.fields(WaveFTConfig)}
    peft_fields = {f.name: f.default for f in dataclasses.fields(peft.WaveFTConfig)}
    assert set(fields) == set(peft_fields)
    assert {k: v for k, v in fields.items() if k != "peft_type"} == {k: v for k, v in peft_fields.items() if k != "peft_type"}
    assert ours == theirs and WaveFTConfig().init_weights is True


def test_default_targets_match_peft():
    pytest.importorskip("peft")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING as theirs

    from peftkit.tuners.waveft.constants import WAVEFT_TARGET_MODULES_BY_MODEL_TYPE as ours

    assert ours == theirs
    model = get_peft_model(llama(), WaveFTConfig(n_frequency=8))
    assert {name.rsplit(".", 1)[1] for name in model.base_model.targeted_module_names} == {"q_proj", "v_proj"}


def test_coif4_warns_that_peft_filters_differ():
    with pytest.warns(UserWarning, match="peft 0.21.2's differ"):
        WaveFTConfig(wavelet_family="coif4")


def test_n_frequency_above_layer_size_and_unsupported_layers_are_refused():
    with pytest.raises(ConfigError, match="less than or equal to the product"):
        get_peft_model(_mlp(), WaveFTConfig(n_frequency=97, target_modules=["0"]))
    with pytest.raises(TypeError, match="WaveFT"):
        get_peft_model(nn.Sequential(nn.Conv2d(2, 2, 3)), WaveFTConfig(n_frequency=4, target_modules=["0"]))


# ---------------------------------------------------------------------------------------------- the transform
@pytest.mark.parametrize("family", ["db1", "db4", "sym5", "coif3", "db38", "coif17"])
def test_filters_are_orthonormal(family):
    lowpass = torch.tensor(RECONSTRUCTION_LOWPASS[family], dtype=torch.float64)
    assert math.isclose(float(lowpass.sum()), math.sqrt(2), abs_tol=1e-8)
    for shift in range(0, len(lowpass) // 2):  # <h, h shifted by 2k> = [k == 0]
        dot = float((lowpass[2 * shift :] * lowpass[: len(lowpass) - 2 * shift]).sum())
        assert math.isclose(dot, 1.0 if shift == 0 else 0.0, abs_tol=1e-8), (family, shift)


def test_haar_reconstruction_by_hand():
    """db1, one coefficient in the low/low quadrant at (0, 0): delta is s / 2 on the top-left 2 x 2 block."""
    model = get_peft_model(_mlp(4, 4), WaveFTConfig(n_frequency=1, scaling=2.0, target_modules=["0"]))
    layer = _layers(model)[0]
    layer.waveft_indices["default"] = torch.tensor([[0], [0]])
    layer._forget_plans("default")
    with torch.no_grad():
        layer.waveft_spectrum["default"].fill_(3.0)
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 3.0 * 2.0 / 2
    prop.assert_close(layer.get_delta_weight("default"), expected)
    layer.waveft_indices["default"] = torch.tensor([[0], [2]])  # the high/low quadrant: columns high-pass
    layer._forget_plans("default")
    expected = torch.zeros(4, 4)
    expected[0, :2], expected[1, :2] = 3.0, -3.0
    prop.assert_close(layer.get_delta_weight("default"), expected)


@pytest.mark.parametrize("family", ["db1", "db2", "sym3", "coif1"])
@pytest.mark.parametrize("size", [6, 7, 10])
def test_analyze_is_the_adjoint_of_synthesize(family, size):
    filters = synthesis_filters(family, torch.float64, torch.device("cpu"))
    axis = Axis.of(size, filters.shape[-1])
    z, x = torch.randn(3, axis.coefficients, dtype=torch.float64), torch.randn(3, size, dtype=torch.float64)
    assert synthesize(z, filters, axis).shape == (3, size)
    torch.testing.assert_close((synthesize(z, filters, axis) * x).sum(), (z * analyze(x, filters, axis)).sum())


@pytest.mark.parametrize("family", ["db1", "sym2", "db3", "coif2"])
@pytest.mark.parametrize("use_idwt", [True, False])
@pytest.mark.parametrize("shape", [(8, 12), (7, 5), (16, 3)])
def test_factored_path_equals_materialized_with_gradients(family, use_idwt, shape):
    in_features, out_features = shape
    torch.manual_seed(3)
    config = WaveFTConfig(n_frequency=11, init_weights=False, wavelet_family=family, use_idwt=use_idwt, target_modules=["0"])
    model = get_peft_model(nn.Sequential(nn.Linear(in_features, out_features)), config)
    layer = _layers(model)[0]
    x = torch.randn(2, 3, in_features, requires_grad=True)
    results = {}
    for mode in ("factored", "materialized"):
        layer.delta_mode = mode
        out = layer(x)
        weights = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)
        grads = torch.autograd.grad((out * weights).sum(), [x, layer.waveft_spectrum["default"]])
        results[mode] = (out.detach(), *grads)
    for factored, materialized in zip(results["factored"], results["materialized"]):
        prop.assert_close(factored, materialized, atol=1e-5 * (1 + float(materialized.abs().max())))  # float32 rounding


def test_without_idwt_the_coefficients_are_delta_entries():
    model = get_peft_model(_mlp(), WaveFTConfig(n_frequency=5, scaling=2.0, init_weights=False, use_idwt=False, target_modules=["0"]))
    layer = _layers(model)[0]
    rows, cols = layer.waveft_indices["default"]
    expected = torch.zeros(12, 8)
    expected[rows, cols] = 2.0 * layer.waveft_spectrum["default"].detach()
    prop.assert_close(layer.get_delta_weight("default"), expected)


def test_auto_picks_factored_for_large_layers():
    model = get_peft_model(nn.Sequential(nn.Linear(512, 512)), WaveFTConfig(n_frequency=64, target_modules=["0"]))
    layer = _layers(model)[0]
    assert layer._path(torch.zeros(64, 512), "default") == "factored"
    layer.delta_mode = "fast"
    with pytest.raises(ValueError, match="delta_mode"):
        layer(torch.zeros(1, 512))


def test_conv1d_delta_is_transposed():
    model = get_peft_model(MODEL_FACTORIES["gpt2"].make_model(), config_for("gpt2", wavelet_family="sym2"))
    layer = next(layer for layer in _layers(model) if isinstance(layer.get_base_layer(), Conv1D))
    x = torch.randn(3, layer.in_features)
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape
    for mode in ("factored", "materialized"):
        layer.delta_mode = mode
        prop.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default"))


# ---------------------------------------------------------------------------------------------- model-level
def test_proportional_parameters_share_the_budget_by_size():
    model = get_peft_model(_mlp(8, 12), WaveFTConfig(n_frequency=10, proportional_parameters=True, target_modules=["0", "2"]))
    sizes = {name: layer.waveft_n_frequency["default"] for name, layer in model.base_model.tuner_layers()}
    # 96 and 48 elements share a budget of 20: round(96 / 144 * 20) = 13, round(48 / 144 * 20) = 7
    assert sizes == {"0": 13, "2": 7}
    model.delete_adapter("default")
    assert "default" not in model.base_model.__dict__.get("_proportional_params_cache", {})


def test_proportional_parameters_give_every_layer_at_least_one():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 1))
    peft_model = get_peft_model(model, WaveFTConfig(n_frequency=1, proportional_parameters=True, target_modules=["0", "1"]))
    assert sorted(layer.waveft_n_frequency["default"] for _, layer in peft_model.base_model.tuner_layers()) == [1, 2]


def test_n_frequency_pattern():
    config = WaveFTConfig(n_frequency=8, n_frequency_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(llama(), config)
    sizes = {name.rsplit(".", 1)[1]: layer.waveft_spectrum["default"].numel() for name, layer in model.base_model.tuner_layers()}
    assert sizes == {"q_proj": 8, "v_proj": 3}


def test_init_weights_true_is_a_noop_and_draws_nothing():
    tiny = MODEL_FACTORIES["llama"]
    prop.fresh_adapter_is_noop(tiny.make_model, tiny.make_inputs(), config_for("llama", init_weights=True))
    base = tiny.make_model()
    before = torch.random.get_rng_state()
    get_peft_model(base, config_for("llama", init_weights=True))
    assert torch.equal(torch.random.get_rng_state(), before)  # as peft: zeros, no random draw
    spectrum = get_peft_model(nn.Sequential(nn.Linear(64, 64)), WaveFTConfig(n_frequency=4000, init_weights=False, target_modules=["0"]))
    values = _layers(spectrum)[0].waveft_spectrum["default"]
    assert abs(float(values.std()) - 0.01) < 0.001


def test_checkpoint_holds_only_the_spectrum():
    state = get_peft_model_state_dict(get_peft_model(llama(), config_for("llama")))
    assert state and all(key.endswith(".waveft_spectrum") for key in state)


def test_bias_only_trains_the_wrapped_biases():
    model = get_peft_model(_mlp(), WaveFTConfig(n_frequency=4, target_modules=["0"], bias="waveft_only"))
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.0.base_layer.bias", "base_model.model.0.waveft_spectrum.default"]


def test_half_precision_base():
    model = get_peft_model(_mlp().to(torch.bfloat16), WaveFTConfig(n_frequency=8, init_weights=False, target_modules=["0"]))
    assert _layers(model)[0].waveft_spectrum["default"].dtype == torch.float32
    out = model(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", CASES)
def test_merge_equals_unmerged(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_equals_unmerged_longer_filter(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config_for(name, wavelet_family="coif2"))


@pytest.mark.parametrize("name", CASES)
def test_merge_unmerge_restores_weights(name):
    prop.check_merge_unmerge_restores_weights(MODEL_FACTORIES[name].make_model, config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_disable_gives_base(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_disable_gives_base(tiny.make_model, tiny.make_inputs(), config_for(name, use_idwt=False))


@pytest.mark.parametrize("name", CASES)
def test_save_load_roundtrip(name, tmp_path):
    tiny = MODEL_FACTORIES[name]
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config_for(name, wavelet_family="sym2"), tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_only_adapter_params_train(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_only_adapter_params_train(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_adapters_switch(name):
    tiny = MODEL_FACTORIES[name]
    second = config_for(name, n_frequency=10, random_loc_seed=5, wavelet_family="db2")
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
