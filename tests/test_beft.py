"""BEFT: config checks, the added bias by hand, merging into the base bias (and the refusal without
one), several adapters, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftkit import BeftConfig, ConfigError, PeftConfig, PeftModel, get_peft_model
from peftkit.tuners.beft.layer import Linear as BeftLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, bert_seq_cls, llama

# Targets with a bias (so merging works); GPT-2's Conv1D is not an nn.Linear (peft refuses it too).
TARGETS = {"bert": ["query", "value", "dense"], "bert-value": ["value"]}


def config_for(name: str, **overrides) -> BeftConfig:
    """Random biases (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(target_modules=TARGETS[name], init_weights=False, task_type=MODEL_FACTORIES["bert"].task_type)
    kwargs.update(overrides)
    return BeftConfig(**kwargs)


class MLP(nn.Module):
    """lin0 has a bias, lin1 has none, emb is no Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(6, 5)
        self.lin1 = nn.Linear(5, 3, bias=False)
        self.emb = nn.Embedding(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def mlp_model(**overrides) -> PeftModel:
    kwargs = dict(target_modules=["lin0"], init_weights=False)
    kwargs.update(overrides)
    torch.manual_seed(1)
    return get_peft_model(MLP(), BeftConfig(**kwargs))


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(BeftConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.BeftConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    assert BeftConfig().init_weights is True and BeftConfig().target_modules is None


@pytest.mark.parametrize(
    "kwargs, message",
    [({"init_weights": "yes"}, "init_weights='yes' is invalid"), ({"target_modules": [1]}, "strings"),
     ({"peft_type": "LORA"}, "must be 'BEFT'")],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BeftConfig(**kwargs)


def test_json_roundtrip_dispatches_to_beft(tmp_path):
    BeftConfig(target_modules=["v_proj"], init_weights=False, modules_to_save=["score"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is BeftConfig
    assert (loaded.target_modules, loaded.init_weights, loaded.modules_to_save) == ({"v_proj"}, False, ["score"])


@pytest.mark.parametrize("make_model, wanted, warns", [(llama, ["v_proj"], True), (bert_seq_cls, ["value"], False)])
def test_default_targets_are_value_projections(make_model, wanted, warns):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(make_model(), BeftConfig())
    assert sorted({key.rpartition(".")[2] for key, _ in model.base_model.tuner_layers()}) == wanted
    assert any("has no bias term" in str(w.message) for w in caught) is warns  # llama's v_proj has no bias


def test_non_linear_targets_are_refused_and_nothing_changes():
    model = MLP()
    with pytest.raises(ValueError, match="BEFT cannot wrap"):
        get_peft_model(model, BeftConfig(target_modules=["lin0", "emb"]))
    assert type(model.lin0) is nn.Linear and type(model.emb) is nn.Embedding


# ---------------------------------------------------------------------------------------------- the maths
def test_output_is_base_plus_bias():
    layer = mlp_model().base_model.model.lin0
    assert type(layer) is BeftLinear
    bias = layer.beft_bias["default"]
    assert bias.shape == (1, 5) and bool((bias != 0).all())
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + bias[0])


def test_default_init_is_zero_and_only_bias_trains():
    model = mlp_model(init_weights=True)
    layer = model.base_model.model.lin0
    assert torch.equal(layer.beft_bias["default"], torch.zeros(1, 5))
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable == ["base_model.model.lin0.beft_bias.default"]
    assert model.get_nb_trainable_parameters()[0] == 5


def test_two_active_adapters_add_their_biases():
    model = mlp_model()
    model.add_adapter("other", BeftConfig(target_modules=["lin0"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.lin0
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = layer.base_layer(x) + layer.beft_bias["default"][0] + layer.beft_bias["other"][0]
        prop.assert_close(layer(x), expected)


def test_bf16_base_keeps_fp32_bias_and_output_dtype():
    torch.manual_seed(1)
    model = get_peft_model(MLP().to(torch.bfloat16), BeftConfig(target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    assert layer.beft_bias["default"].dtype == torch.float32
    out = layer(torch.randn(2, 6, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- merging
def test_merge_adds_to_base_bias_and_never_touches_the_weight():
    model = mlp_model()
    model.add_adapter("other", BeftConfig(target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    weight, b0 = layer.base_layer.weight, layer.base_layer.bias.detach().clone()
    w0 = weight.detach().clone()
    model.merge_adapter(["default", "other"])
    expected = b0 + layer.beft_bias["default"][0] + layer.beft_bias["other"][0]
    prop.assert_close(layer.base_layer.bias, expected.detach())
    assert layer.base_layer.weight is weight and torch.equal(weight, w0)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.bias, b0) and layer._bias_before_merge is None


def test_base_without_bias_warns_and_refuses_to_merge_anything():
    with pytest.warns(UserWarning, match="Detected that the base layer has no bias term"):
        model = mlp_model(target_modules=["lin0", "lin1"])
    b0 = model.base_model.model.lin0.base_layer.bias.detach().clone()
    with pytest.raises(ValueError, match="Base layer has no bias, cannot merge bias adapter default"):
        model.merge_adapter()
    lin0 = model.base_model.model.lin0
    assert not lin0.merged and torch.equal(lin0.base_layer.bias, b0)  # nothing merged (peft merges lin0 first)


def test_safe_merge_refuses_nan_and_keeps_bias():
    model = mlp_model()
    layer = model.base_model.model.lin0
    b0 = layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        layer.beft_bias["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.bias, b0) and not layer.merged


def test_merge_and_unload_gives_plain_linear():
    model = mlp_model()
    x = torch.randn(3, 6)
    with torch.no_grad():
        adapted = model(x)
        merged = model.merge_and_unload()
        prop.assert_close(merged(x), adapted)
    assert type(merged.lin0) is nn.Linear


def test_save_load_roundtrip_keys(tmp_path):
    model = mlp_model()
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == {"base_model.model.lin0.beft_bias"}
    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path))
    x = torch.randn(2, 6)
    with torch.no_grad():
        prop.assert_close(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------- properties
CASES = list(TARGETS)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES["bert"]


# merging adds to the base bias and leaves the weight alone, so the weight-restoring check does not apply
globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"target_modules": TARGETS[name][:1]},
    leave_out=("test_merge_unmerge_restores_weights",),
))
