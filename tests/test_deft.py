"""DEFT: config checks, the subspace-replacement update by hand (relu, qr, PaRa, alpha, Conv1D),
the no-op init, exact unmerge, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftkit import ConfigError, DeftConfig, PeftConfig, get_peft_model
from peftkit.tuners.deft import DeftLayer
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"],
           "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> DeftConfig:
    """Rank 2, qr projector and random R: an O(1) change of the outputs (relu's is ~|P|^2, tiny at init)."""
    kwargs = dict(r=2, target_modules=TARGETS[name], init_weights=False, decomposition_method="qr",
                  task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return DeftConfig(**kwargs)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)
        self.emb = nn.Embedding(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.lin(x)))


def adapted_weight(layer: DeftLayer, name: str = "default") -> torch.Tensor:
    """W' = (I - P_proj) W + Q_P (s R), written out with the full out x out projector."""
    P, W = layer.deft_P[name].detach(), layer.get_base_layer().weight.detach()
    W = W.T if layer.fan_in_fan_out else W
    if layer.deft_decomposition[name] == "qr":
        Q, _ = torch.linalg.qr(P)
        right = Q
    else:
        Q, right = P, torch.relu(P)
    projector = Q @ right.T
    removed = (torch.eye(W.shape[0]) - projector) @ W
    if layer.deft_para[name]:
        return removed
    return removed + Q @ (layer.deft_scaling[name] * layer.deft_R[name].detach())


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(DeftConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.DeftConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    config = DeftConfig()
    assert (config.r, config.decomposition_method, config.alpha, config.para, config.init_weights) == (8, "relu", None, False, True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decomposition_method": "svd"}, "Unknown decomposition_method 'svd'"),
        ({"r": 0}, "r=0 is invalid"),
        ({"deft_dropout": 1.5}, "deft_dropout=1.5 is invalid"),
        ({"bias": "lora_only"}, "bias='lora_only' is invalid"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "`layers_to_transform` cannot be used"),
        ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "`layers_pattern` cannot be used"),
        ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
        ({"para": "yes"}, "para='yes' is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DeftConfig(**kwargs)


def test_json_roundtrip_dispatches_to_deft(tmp_path):
    DeftConfig(r=3, decomposition_method="qr", alpha=6, para=True, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is DeftConfig
    assert (loaded.r, loaded.decomposition_method, loaded.alpha, loaded.para) == (3, "qr", 6, True)


def test_default_targets_are_query_value():
    model = get_peft_model(llama(), DeftConfig(r=2))
    assert sorted({key.rpartition(".")[2] for key, _ in model.base_model.tuner_layers()}) == ["q_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("method", ["relu", "qr"])
@pytest.mark.parametrize("alpha", [None, 8])
def test_linear_forward_is_subspace_replacement(method, alpha):
    config = DeftConfig(r=3, target_modules=["lin"], init_weights=False, decomposition_method=method, alpha=alpha)
    layer = get_peft_model(Net(), config).base_model.model.lin
    assert type(layer) is DeftLayer
    assert layer.deft_P["default"].shape == (5, 3) and layer.deft_R["default"].shape == (3, 6)
    assert layer.deft_scaling["default"] == (8 / 3 if alpha else 1.0)
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = x @ adapted_weight(layer).T + layer.get_base_layer().bias
        prop.assert_close(layer(x), expected)
        prop.assert_close(layer.get_delta_weight("default"), adapted_weight(layer) - layer.get_base_layer().weight)


@pytest.mark.parametrize("method", ["relu", "qr"])
def test_para_removes_subspace_only_and_has_no_r(method):
    config = DeftConfig(r=2, target_modules=["lin"], decomposition_method=method, para=True)
    model = get_peft_model(Net(), config)
    layer = model.base_model.model.lin
    assert "default" not in layer.deft_R and [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.lin.deft_P.default"
    ]
    x = torch.randn(4, 6)
    with torch.no_grad():
        prop.assert_close(layer(x), x @ adapted_weight(layer).T + layer.get_base_layer().bias)
        assert not torch.allclose(layer(x), layer.get_base_layer()(x), atol=1e-6)  # PaRa is no no-op


@pytest.mark.parametrize("method", ["relu", "qr"])
def test_default_init_is_a_noop_with_nonzero_factors(method):
    layer = get_peft_model(Net(), DeftConfig(r=2, target_modules=["lin"], decomposition_method=method, alpha=4)).base_model.model.lin
    P, R, W = layer.deft_P["default"], layer.deft_R["default"], layer.get_base_layer().weight
    assert 0.005 < float(P.std()) < 0.05 and float(R.abs().max()) > 0
    x = torch.randn(3, 6)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.get_base_layer()(x), atol=1e-6)
        assert float(layer.get_delta_weight("default").abs().max()) < 1e-6
        right = torch.relu(P) if method == "relu" else torch.linalg.qr(P)[0]
        prop.assert_close(R * layer.deft_scaling["default"], right.T @ W)


def test_random_r_uses_init_scale():
    layer = get_peft_model(Net(), DeftConfig(r=4, target_modules=["lin"], init_weights=False, init_scale=10.0)).base_model.model.lin
    assert 0.1 < float(layer.deft_R["default"].std()) < 0.4  # N(0, (0.02 * 10)^2)


def test_rank_is_capped_at_out_features():
    layer = get_peft_model(Net(), DeftConfig(r=8, alpha=10, target_modules=["out"])).base_model.model.out
    assert layer.deft_r["default"] == 3 and layer.deft_P["default"].shape == (3, 3)
    assert layer.deft_scaling["default"] == 10 / 3


def test_conv1d_gpt2_uses_transposed_layout_and_fixes_config():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        model = get_peft_model(gpt2(), DeftConfig(r=2, target_modules=["c_attn"], init_weights=False, decomposition_method="qr"))
    assert model.peft_config["default"].fan_in_fan_out is True  # peft records the layout
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.deft_P["default"].shape == (96, 2)
    x = torch.randn(3, 32)
    with torch.no_grad():
        prop.assert_close(layer(x), x @ adapted_weight(layer).T + layer.get_base_layer().bias)
        assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape


def test_fan_in_fan_out_on_linear_warns_as_peft():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        model = get_peft_model(Net(), DeftConfig(target_modules=["lin"], fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is False


def test_embedding_is_refused_and_nothing_changes():
    model = Net()
    with pytest.raises(ValueError, match="DEFT cannot wrap"):
        get_peft_model(model, DeftConfig(target_modules=["lin", "emb"]))
    assert type(model.lin) is nn.Linear


def test_dropout_applies_to_injection_input_only_in_training():
    config = DeftConfig(r=2, target_modules=["lin"], init_weights=False, decomposition_method="qr", deft_dropout=0.5)
    layer = get_peft_model(Net(), config).base_model.model.lin
    x = torch.randn(8, 6)
    with torch.no_grad():
        layer.eval()
        evaluated = layer(x)
        layer.train()
        trained = layer(x)
    assert not torch.allclose(evaluated, trained)
    prop.assert_close(evaluated, x @ adapted_weight(layer).T + layer.get_base_layer().bias)


def test_scaling_api_warns_and_changes_nothing():
    layer = get_peft_model(Net(), DeftConfig(target_modules=["lin"])).base_model.model.lin
    with pytest.warns(UserWarning, match="Scaling operation for DEFT not supported"):
        layer.scale_layer(2.0)
    with pytest.warns(UserWarning, match="Unscaling operation for DEFT not supported"):
        layer.unscale_layer()
    assert layer.deft_scaling["default"] == 1.0


# ---------------------------------------------------------------------------------------------- merging
def two_adapter_net():
    model = get_peft_model(Net(), DeftConfig(r=2, target_modules=["lin"], init_weights=False, decomposition_method="qr"))
    model.add_adapter("other", DeftConfig(r=3, target_modules=["lin"], init_weights=False, decomposition_method="qr"))
    model.base_model.set_adapter(["default", "other"])
    return model


def test_batch_merge_adds_deltas_of_w0_and_unmerges_exactly():
    model = two_adapter_net()
    layer = model.base_model.model.lin
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 6)
    with torch.no_grad():
        both = model(x)
        expected = w0 + layer.get_delta_weight("default") + layer.get_delta_weight("other")
        model.merge_adapter(["default", "other"])
        prop.assert_close(layer.base_layer.weight, expected)
        prop.assert_close(model(x), both)
        assert set(layer._cached_merge_factor) == {"default", "other"}
        model.unmerge_adapter()
    prop.assert_close(layer.base_layer.weight, w0, atol=1e-6)
    assert not layer._cached_merge_factor and not layer.merged


def test_sequential_merge_unmerges_exactly_although_not_invertible():
    model = two_adapter_net()
    layer = model.base_model.model.lin
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.merge_adapter(["default"])
        w1 = layer.base_layer.weight.detach().clone()
        model.merge_adapter(["other"])
        # the second delta is taken from the merged weight W1, as in peft
        prop.assert_close(layer.base_layer.weight, w1 + layer.get_delta_weight("other").new_tensor(
            layer._delta_from_factor("other", layer._merge_factor("other", w1))))
        model.unmerge_adapter()
    prop.assert_close(layer.base_layer.weight, w0, atol=1e-6)


def test_safe_merge_refuses_nan_and_keeps_weights():
    model = get_peft_model(Net(), DeftConfig(r=2, target_modules=["lin"], init_weights=False))
    layer = model.base_model.model.lin
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.deft_R["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged and not layer._cached_merge_factor


def test_bias_deft_only_trains_and_saves_target_biases(tmp_path):
    model = get_peft_model(Net(), DeftConfig(r=2, target_modules=["lin"], bias="deft_only"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.lin.base_layer.bias", "base_model.model.lin.deft_P.default",
                         "base_model.model.lin.deft_R.default"]
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == [
        "base_model.model.lin.base_layer.bias", "base_model.model.lin.deft_P", "base_model.model.lin.deft_R"]


def test_low_cpu_mem_usage_load_matches(tmp_path):
    from peftkit import PeftModel

    model = get_peft_model(Net(), DeftConfig(r=2, target_modules=["lin"], init_weights=False, decomposition_method="qr"))
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(Net(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    with torch.no_grad():
        prop.assert_close(loaded(x), expected, atol=0)


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 3, "target_modules": TARGETS[name][:1]},
    fresh=({"init_weights": True, "decomposition_method": "relu"}, {"init_weights": True, "decomposition_method": "qr"}),
))


