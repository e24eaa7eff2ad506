"""MiSS: config checks, the shard update by hand (default, remainder, mini, bat), merging, bias
options, quantized bases, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from peftkit import ConfigError, MissConfig, PeftConfig, TargetModulesError, get_peft_model
from peftkit.quantization import Linear4bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.miss.layer import MissLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> MissConfig:
    """Shards of 4, a random (Kaiming) shard: a non-trivial adapter, the case's targets and task."""
    kwargs = dict(r=4, target_modules=TARGETS[name], init_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return MissConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


def layer_of(config: MissConfig, name: str = "lin0") -> MissLinear:
    return getattr(get_peft_model(MLP(), config).base_model.model, name)


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(MissConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.MissConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"mini_r": -1}, "mini_r=-1 is invalid"),
        ({"miss_dropout": 2.0}, "miss_dropout=2.0 is invalid"),
        ({"init_weights": "pissa"}, "init_weights='pissa' is not supported"),
        ({"init_weights": 1}, "init_weights=1 is not supported"),
        ({"bias": "some"}, "bias='some' is invalid"),
        ({"target_modules": ".*q", "layers_to_transform": 0}, "`layers_to_transform` cannot be used"),
        ({"target_modules": ".*q", "layers_pattern": "layers"}, "`layers_pattern` cannot be used"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MissConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 11}, r"`r` \(11\) must be less than or equal to in_features \(10\)"),
        ({"r": 3, "init_weights": "bat"}, r"fully divisible into \[r, r\] blocks"),
        ({"r": 2, "init_weights": "mini", "mini_r": 3}, "out_features be divisible by mini_r"),
    ],
)
def test_layer_checks_refuse_and_leave_model_unchanged(kwargs, message):
    model = MLP()
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, MissConfig(target_modules=["lin0"], **kwargs))
    assert type(model.lin0) is nn.Linear


def test_json_roundtrip_dispatches_to_miss(tmp_path):
    MissConfig(r=8, init_weights="mini", mini_r=2, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is MissConfig and (loaded.r, loaded.init_weights, loaded.mini_r) == (8, "mini", 2)


def test_only_linear_layers_are_wrapped():
    with pytest.raises(TargetModulesError, match="MiSS cannot wrap"):
        get_peft_model(gpt2(), MissConfig(r=2, target_modules=["c_attn"]))


# ---------------------------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("r", [2, 3])  # 3 leaves a remainder: in_features = 10
def test_default_shard_is_added_to_every_column_block(r):
    layer = layer_of(MissConfig(r=r, target_modules=["lin0"], init_weights=False))
    shard = layer.miss_block["default"]
    assert shard.shape == (r, 8)
    delta = torch.stack([shard[i % r] for i in range(10)], dim=1)  # delta[o, i] = D[i mod r, o]
    x = torch.randn(5, 10)
    with torch.no_grad():
        prop.assert_close(layer.get_delta_weight("default"), delta)
        prop.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)


def test_mini_shard_repeats_along_out_features():
    layer = layer_of(MissConfig(r=2, mini_r=4, target_modules=["lin0"], init_weights="mini"))
    assert torch.equal(layer.miss_block["default"], torch.zeros(2, 4))  # a no-op at first
    with torch.no_grad():
        layer.miss_block["default"].normal_()
    block = layer.miss_block["default"]
    delta = torch.stack([block[i % 2].repeat(2) for i in range(10)], dim=1)
    x = torch.randn(3, 10)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)


def test_bat_transforms_each_block_and_unmerges_exactly():
    model = get_peft_model(MLP(), MissConfig(r=2, target_modules=["lin0"], init_weights="bat"))
    layer = model.base_model.model.lin0
    assert torch.equal(layer.miss_block["default"], torch.zeros(4, 2, 2))
    with torch.no_grad():
        layer.miss_block["default"].normal_(std=0.3)
    w0 = layer.base_layer.weight.detach().clone()
    b = layer.miss_block["default"].detach()
    expected = w0.clone()
    for j in range(4):
        for k in range(5):
            block = w0[2 * j: 2 * j + 2, 2 * k: 2 * k + 2]
            expected[2 * j: 2 * j + 2, 2 * k: 2 * k + 2] = block @ (torch.eye(2) + b[j]) + b[j]
    x = torch.randn(3, 10)
    with torch.no_grad():
        prop.assert_close(layer(x), x @ expected.T + layer.base_layer.bias)
    model.merge_adapter()
    prop.assert_close(layer.base_layer.weight.detach(), expected)
    model.unmerge_adapter()
    prop.assert_close(layer.base_layer.weight.detach(), w0)


@pytest.mark.parametrize(
    "bias, trained, saved",
    [("none", set(), set()), ("all", {"lin0", "lin1"}, {"lin0.base_layer.bias", "lin1.bias"}),
     ("MiSS_only", {"lin0"}, {"lin0.base_layer.bias"})],
)
def test_bias_options_train_and_save_biases(bias, trained, saved):
    model = get_peft_model(MLP(), MissConfig(r=2, target_modules=["lin0"], bias=bias))
    names = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert names == trained
    from peftkit import get_peft_model_state_dict

    keys = {key.removeprefix("base_model.model.") for key in get_peft_model_state_dict(model)}
    assert keys == {"lin0.miss_block"} | saved  # the keys peft saves


def test_two_adapters_merged_and_unmerged():
    model = get_peft_model(MLP(), MissConfig(r=2, target_modules=["lin0"], init_weights=False))
    model.add_adapter("other", MissConfig(r=5, target_modules=["lin0"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 10)
    with torch.no_grad():
        both = model(x)
        model.merge_adapter()
        prop.assert_close(model(x), both)
        model.unmerge_adapter()
        prop.assert_close(model(x), both)


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("init", [False, "bat"])
def test_quantized_base_matches_dequantized_reference(init):
    inputs = lm_inputs()
    quant = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    config = MissConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=init, task_type="CAUSAL_LM")
    model = get_peft_model(quantize_model(llama(), quant), config)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert type(layer) is MissLinear and isinstance(layer.get_base_layer(), Linear4bit)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "miss_block" in name:
                param.normal_(std=0.2)
    reference = get_peft_model(dequantize_model(quantize_model(llama(), quant), torch.float32), config)
    assert not reference.load_state_dict({k: v for k, v in model.state_dict().items() if "miss_" in k}, strict=False).unexpected_keys
    got = prop.output_of(model, inputs)
    prop.assert_close(got, prop.output_of(reference, inputs), atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    merged = prop.output_of(model, inputs)
    assert float((merged - got).abs().mean()) < 0.5 * float(got.abs().mean())


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 2, "target_modules": TARGETS[name][:1]},
    fresh=tuple({"init_weights": init, "mini_r": 2} for init in (True, "bat", "mini")),
    train=({"init_weights": True}, {"init_weights": "bat"}),
    lr=2e-2,
))


