"""(IA)^3: config, per-architecture defaults, the layer math by hand, and the shared property suite."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import ConfigError, IA3Config, PeftConfig, TargetModulesError, get_peft_model
from peftkit.tuners.ia3 import Conv, Linear
from peftkit.tuners.ia3.layer import IA3Layer
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, bert_seq_cls, gpt2, llama, t5

CASES = ["llama", "gpt2", "bert", "t5"]
# Attention-only targets: a second adapter that wraps fewer modules than the first.
ATTENTION_TARGETS = {"llama": ["k_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["key", "value"], "t5": ["k", "v"]}


def ia3(name: str, **overrides) -> IA3Config:
    """Per-architecture default targets, random vectors (a non-trivial adapter), the case's task."""
    kwargs = dict(init_ia3_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return IA3Config(**kwargs)


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(IA3Config)}
    theirs = {f.name: f for f in dataclasses.fields(peft.IA3Config)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":  # peft sets it in __post_init__; ours is the field default
            assert ours[name].default == their_field.default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_modules": ["k", "v"], "feedforward_modules": ["wo"]}, r"feedforward_modules \['wo'\].*add it"),
        ({"target_modules": ["k", 3]}, "strings"),
        ({"feedforward_modules": 5}, "list of strings"),
        ({"fan_in_fan_out": "yes"}, "fan_in_fan_out='yes'"),
        ({"init_ia3_weights": 1}, "init_ia3_weights=1"),
        ({"peft_type": "LORA"}, "must be 'IA3'"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        IA3Config(**kwargs)


def test_feedforward_names_may_select_full_path_targets():
    """A saved "all-linear" config lists full paths; its short feed-forward names still load."""
    IA3Config(target_modules=["model.layers.0.mlp.down_proj", "k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match="mlp.c_proj"):  # more specific than the target: as peft, refused
        IA3Config(target_modules=["c_proj"], feedforward_modules=["mlp.c_proj"])


def test_json_roundtrip(tmp_path):
    config = IA3Config(target_modules=["k", "wo"], feedforward_modules=["wo"], task_type="SEQ_2_SEQ_LM")
    config.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, IA3Config)
    assert loaded.target_modules == {"k", "wo"} and loaded.feedforward_modules == {"wo"}


@pytest.mark.parametrize(
    "factory, targets, feedforward",
    [
        (llama, {"k_proj", "v_proj", "down_proj"}, {"down_proj"}),
        (gpt2, {"c_attn", "mlp.c_proj"}, {"mlp.c_proj"}),
        (bert_seq_cls, {"key", "value", "output.dense"}, {"output.dense"}),
        (t5, {"k", "v", "wo"}, {"wo"}),
    ],
)
def test_default_targets_and_feedforward_per_architecture(factory, targets, feedforward):
    model = get_peft_model(factory(), IA3Config())
    config = model.peft_config["default"]
    assert config.target_modules == targets and config.feedforward_modules == feedforward
    layers = dict(model.base_model.tuner_layers())
    assert {name.rpartition(".")[2] for name in layers} == {t.rpartition(".")[2] for t in targets}
    # peft's feed-forward rule is a plain suffix test: "output.dense" also covers attention.output.dense
    for name, layer in layers.items():
        assert layer.is_feedforward == any(name.endswith(f) for f in feedforward), name


def test_all_linear_with_short_feedforward_names():
    model = get_peft_model(llama(), IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"]))
    layers = dict(model.base_model.tuner_layers())
    assert len(layers) == 2 * 7
    assert sorted(n for n, layer in layers.items() if layer.is_feedforward) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_custom_model_needs_feedforward_modules():
    with pytest.raises(ConfigError, match="feedforward_modules is not set"):
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), IA3Config(target_modules=["0"]))
    with pytest.raises(ConfigError, match="target_modules is not set"):
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), IA3Config())
    get_peft_model(nn.Sequential(nn.Linear(2, 2)), IA3Config(target_modules=["0"], feedforward_modules=[]))


def test_unsupported_layer_names_supported_types():
    with pytest.raises(TargetModulesError, match="Embedding.*Supported: torch.nn.Linear, transformers' Conv1D"):
        get_peft_model(llama(), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))


def test_fan_in_fan_out_follows_the_layer_with_a_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True"):
        model = get_peft_model(gpt2(), IA3Config())
    assert model.peft_config["default"].fan_in_fan_out is True
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False"):
        model = get_peft_model(llama(), IA3Config(fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is False


# ---------------------------------------------------------------------------------------------- layer math
def _wrapped(base: nn.Module, feedforward: bool) -> nn.Module:
    config = IA3Config(target_modules=["0"], feedforward_modules=["0"] if feedforward else [], init_ia3_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(nn.Sequential(base), config)


@pytest.mark.parametrize("feedforward", [False, True], ids=["attention", "feedforward"])
@pytest.mark.parametrize("kind", ["linear", "conv1d-gpt2"])
def test_linear_scales_output_or_input_by_hand(kind, feedforward):
    torch.manual_seed(0)
    base = nn.Linear(5, 3) if kind == "linear" else Conv1D(3, 5)
    model = _wrapped(base, feedforward)
    layer = model.base_model.model[0]
    assert isinstance(layer, Linear) and layer.fan_in_fan_out == (kind != "linear")
    vector = layer.ia3_l["default"]
    assert vector.shape == ((1, 5) if feedforward else (3, 1))
    x = torch.randn(4, 5)
    with torch.no_grad():
        expected = base(x * vector.flatten()) if feedforward else base(x) * vector.flatten()
        prop.assert_close(model(x), expected)
        weight = base.weight.clone()
        model.merge_adapter()
        prop.assert_close(model(x), expected)
        if kind == "linear" and not feedforward:
            prop.assert_close(base.weight, weight * vector)  # row o of W times l[o]
        model.unmerge_adapter()
        assert torch.allclose(base.weight, weight, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("feedforward", [False, True], ids=["attention", "feedforward"])
@pytest.mark.parametrize("conv_cls", [nn.Conv2d, nn.Conv3d])
def test_conv_merge_matches_forward(conv_cls, feedforward, groups):
    torch.manual_seed(0)
    base = conv_cls(4, 6, 3, padding=1, groups=groups)
    model = _wrapped(base, feedforward)
    layer = model.base_model.model[0]
    assert isinstance(layer, Conv)
    x = torch.randn(2, 4, *(5,) * (base.weight.dim() - 2))
    vector = layer.ia3_l["default"].flatten()
    with torch.no_grad():
        view = (-1,) + (1,) * (base.weight.dim() - 2)
        expected = base(x * vector.view(view)) if feedforward else base(x) * vector.view(view)
        prop.assert_close(model(x), expected)
        prop.assert_close(model(x[0]), expected[0])  # unbatched input
        model.merge_adapter()
        prop.assert_close(model(x), expected)


def test_two_active_adapters_multiply_and_merge():
    torch.manual_seed(0)
    model = _wrapped(nn.Linear(5, 3), feedforward=False)
    model.add_adapter("other", IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False))
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model[0]
    x = torch.randn(4, 5)
    with torch.no_grad():
        expected = layer.base_layer(x) * (layer.ia3_l["default"] * layer.ia3_l["other"]).flatten()
        prop.assert_close(model(x), expected)
        model.merge_adapter()
        assert layer.merged_adapters == ["default", "other"]
        prop.assert_close(model(x), expected)


def test_safe_merge_refuses_non_finite_vectors():
    from peftkit import AdapterStateError

    model = _wrapped(nn.Linear(5, 3), feedforward=False)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.ia3_l["default"][0, 0] = float("inf")
    weight = layer.base_layer.weight.clone()
    with pytest.raises(AdapterStateError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    ia3,
    second=lambda name: {"target_modules": ATTENTION_TARGETS[name], "feedforward_modules": []},
    fresh=({"init_ia3_weights": True},),
    train=({"init_ia3_weights": True},),
))


# ---------------------------------------------------------------------------------------------- folded path
def _folded_node(output: torch.Tensor) -> bool:
    return type(output.grad_fn).__name__ == "IA3LinearFunctionBackward"


def _grads(layer: nn.Module, x: torch.Tensor, forward) -> list[torch.Tensor]:
    """Output, then the gradients of x and of every trainable parameter of `layer`, for `forward(x)`."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out = forward(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return [out.detach(), x.grad.clone(), *(p.grad.clone() for p in layer.parameters() if p.requires_grad)]


@pytest.mark.parametrize("feedforward", [False, True], ids=["attention", "feedforward"])
@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv1d-gpt2"])
@pytest.mark.parametrize("trainable_base", [False, True])
def test_folded_function_matches_the_module_path(kind, feedforward, trainable_base):
    """The vector folded into W gives the module path's output and gradients (x, l, and W, b if they train)."""
    torch.manual_seed(0)
    base = {"linear": nn.Linear(6, 4), "linear_no_bias": nn.Linear(6, 4, bias=False), "conv1d-gpt2": Conv1D(4, 6)}[kind]
    layer = _wrapped(base, feedforward).base_model.model[0]
    layer.base_layer.requires_grad_(trainable_base)
    x = torch.randn(3, 5, 6).requires_grad_()
    assert _folded_node(layer(x))
    folded = _grads(layer, x, layer)
    expected = _grads(layer, x, lambda inp: IA3Layer.forward(layer, inp))  # the module path
    assert len(folded) == 3 + trainable_base * (1 + (kind != "linear_no_bias"))
    for got, want in zip(folded, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_folded_path_is_left_where_it_cannot_apply():
    """A zero in l (dividing by it), few tokens (decoding), two active adapters, a hooked base, merged
    weights: the module path."""
    torch.manual_seed(0)
    model = _wrapped(nn.Linear(6, 4), feedforward=False)
    layer = model.base_model.model[0]
    x = torch.randn(8, 6)
    assert not _folded_node(layer(x[:6]))  # 6 tokens: scaling the 4 x 6 weight costs more than the 6 x 4 output
    with torch.no_grad():
        layer.ia3_l["default"][1] = 0.0
    out = layer(x)
    assert not _folded_node(out)
    torch.testing.assert_close(out, layer.base_layer(x) * layer.ia3_l["default"].flatten())
    with torch.no_grad():
        layer.ia3_l["default"][1] = 0.5
    assert _folded_node(layer(x))
    model.add_adapter("other", IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False))
    layer.set_adapter(["default", "other"])
    assert not _folded_node(layer(x))
    layer.set_adapter("default")
    handle = layer.base_layer.register_forward_hook(lambda *_: None)
    assert not _folded_node(layer(x))
    handle.remove()
    model.merge_adapter()
    assert not _folded_node(layer(x))
