"""PEANuT: config checks, the weight-aware update by hand (depth 0 and with skips), merging from W0,
unsupported layers, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftkit import ConfigError, PeanutConfig, PeftConfig, get_peft_model, get_peft_model_state_dict
from peftkit.tuners.peanut.layer import Linear as PeanutLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> PeanutConfig:
    """Rank 4, one hidden layer per side, random B (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(r=4, depth=1, target_modules=TARGETS[name], init_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return PeanutConfig(**kwargs)


class Net(nn.Module):
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
    ours = {f.name: f.default for f in dataclasses.fields(PeanutConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.PeanutConfig)}
    assert {k: v for k, v in ours.items() if k != "peft_type"} == {k: v for k, v in theirs.items() if k != "peft_type"}
    assert (PeanutConfig().r, PeanutConfig().depth, PeanutConfig().act_fn) == (32, 0, "relu")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"r": 0}, "`r` must be a positive integer"), ({"depth": -1}, "`depth` can only be a non-negative integer"),
     ({"act_fn": "nope"}, "Unsupported `act_fn`: nope"), ({"scaling": float("nan")}, "scaling=nan is invalid"),
     ({"layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
     ({"target_modules": [1]}, "strings")],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PeanutConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_json_roundtrip_dispatches_to_peanut(tmp_path):
    PeanutConfig(r=3, depth=2, act_fn="gelu", scaling=0.5, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is PeanutConfig
    assert (loaded.r, loaded.depth, loaded.act_fn, loaded.scaling) == (3, 2, "gelu", 0.5)


def test_default_targets_are_query_value():
    model = get_peft_model(llama(), PeanutConfig(r=2))
    assert sorted({key.rpartition(".")[2] for key, _ in model.base_model.tuner_layers()}) == ["q_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------- the maths
def test_depth_zero_update_by_hand():
    model = get_peft_model(Net(), PeanutConfig(r=3, target_modules=["lin0"], init_weights=False, scaling=0.5))
    layer = model.base_model.model.lin0
    assert type(layer) is PeanutLinear
    a, b, w = layer.peanut_A["default"].weight, layer.peanut_B["default"].weight, layer.base_layer.weight
    assert a.shape == (3, 20) and b.shape == (20, 3)  # A reads the output dimension of W
    delta = 0.5 * (torch.relu(w.T @ a.T) @ b.T).T
    x = torch.randn(4, 10)
    with torch.no_grad():
        prop.assert_close(layer.get_delta_weight("default"), delta)
        prop.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)


def test_skip_connections_by_hand():
    model = get_peft_model(Net(), PeanutConfig(r=3, depth=2, act_fn="tanh", target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    enc = [m.weight for m in layer.peanut_encoders["default"]]
    dec = [m.weight for m in layer.peanut_decoders["default"]]
    a, b, w = layer.peanut_A["default"].weight, layer.peanut_B["default"].weight, layer.base_layer.weight
    h0 = torch.tanh(w.T @ a.T)
    h1 = torch.tanh(h0 @ enc[0].T)
    h2 = torch.tanh(h1 @ enc[1].T)
    u1 = torch.tanh(h2 @ dec[0].T) + h1
    u2 = torch.tanh(u1 @ dec[1].T) + h0
    with torch.no_grad():
        prop.assert_close(layer.get_delta_weight("default"), (u2 @ b.T).T)


def test_init_true_is_noop_and_b_is_zero():
    layer = get_peft_model(Net(), PeanutConfig(r=3, depth=1, target_modules=["lin0"])).base_model.model.lin0
    assert torch.equal(layer.peanut_B["default"].weight, torch.zeros(20, 3))
    assert float(layer.peanut_A["default"].weight.abs().sum()) > 0
    x = torch.randn(2, 10)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x))


def test_unsupported_layers_raise_not_implemented():
    with pytest.raises(NotImplementedError, match="PEANuT does not support target modules of type"):
        get_peft_model(Net(), PeanutConfig(r=2, target_modules=["emb"]))
    model = gpt2()
    with pytest.raises(NotImplementedError, match="Conv1D"):
        get_peft_model(model, PeanutConfig(r=2, target_modules=["c_attn"]))
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # nothing changed


def test_checkpoint_keys_drop_the_adapter_name_inside_module_lists():
    model = get_peft_model(Net(), PeanutConfig(r=2, depth=2, target_modules=["lin0"]))
    model.add_adapter("other", PeanutConfig(r=2, depth=1, target_modules=["lin0"]))
    keys = sorted(get_peft_model_state_dict(model, adapter_name="other"))
    prefix = "base_model.model.lin0."
    assert keys == [prefix + k for k in ("peanut_A.weight", "peanut_B.weight", "peanut_decoders.0.weight",
                                         "peanut_encoders.0.weight")]


# ---------------------------------------------------------------------------------------------- merging
def test_two_adapters_merge_from_w0_and_unmerge_exactly():
    model = get_peft_model(Net(), PeanutConfig(r=2, target_modules=["lin0"], init_weights=False))
    model.add_adapter("other", PeanutConfig(r=3, depth=1, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        d1, d2 = layer.get_delta_weight("default"), layer.get_delta_weight("other")
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(3, 10)
    with torch.no_grad():
        both = layer(x)
        model.merge_adapter()
        prop.assert_close(layer.base_layer.weight, w0 + d1 + d2)  # both updates computed from W0
        prop.assert_close(layer(x), both)
        model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0)
    assert layer._base_weight_before_merge is None


def test_safe_merge_refuses_nan_and_keeps_weights():
    model = get_peft_model(Net(), PeanutConfig(r=2, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.peanut_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_bf16_base_keeps_fp32_adapter_and_output_dtype():
    model = get_peft_model(Net().to(torch.bfloat16), PeanutConfig(r=2, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    assert layer.peanut_A["default"].weight.dtype == torch.float32
    assert layer(torch.randn(2, 10, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- properties
CASES = list(TARGETS)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 3, "depth": 0, "target_modules": TARGETS[name][:1]},
))


