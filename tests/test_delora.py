"""DeLoRA: config checks, the bounded update by hand, the saved column norms, merging, bias options,
patterns, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftkit import ConfigError, DeloraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peftkit.quantization import QuantizationConfig, quantize_model
from peftkit.tuners.delora.layer import DeloraLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> DeloraConfig:
    """Rank 4, random A and B (init_weights=False): a non-trivial adapter, the case's targets and task."""
    kwargs = dict(r=4, delora_lambda=2, target_modules=TARGETS[name], init_weights=False,
                  task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return DeloraConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


def layer_of(config: DeloraConfig, name: str = "lin0") -> DeloraLinear:
    return getattr(get_peft_model(MLP(), config).base_model.model, name)


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(DeloraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.DeloraConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    assert (DeloraConfig().r, DeloraConfig().delora_lambda) == (8, 15)



def test_default_targets_are_pefts():
    constants = pytest.importorskip("peft.utils.constants")
    from peftkit.tuners.delora.model import DELORA_TARGET_MODULES_BY_MODEL_TYPE, TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING

    assert TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING is DELORA_TARGET_MODULES_BY_MODEL_TYPE
    assert DELORA_TARGET_MODULES_BY_MODEL_TYPE == dict(constants.TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING)
    model = llama()
    wrapped = get_peft_model(model, DeloraConfig(r=2))
    assert sorted(wrapped.peft_config["default"].target_modules) == ["q_proj", "v_proj"]

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "`r` must be a positive integer; got 0"),
        ({"r": 2.5}, "`r` must be a positive integer; got 2.5"),
        ({"delora_lambda": "big"}, "delora_lambda='big' is invalid"),
        ({"module_dropout": 1.5}, "module_dropout=1.5 is invalid"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian' is invalid"),
        ({"bias": "some"}, "bias='some' is invalid"),
        ({"rank_pattern": {"lin0": 0}}, r"`rank_pattern\['lin0'\]` must be a positive integer"),
        ({"lambda_pattern": {"lin0": None}}, r"lambda_pattern\['lin0'\]=None is invalid"),
        ({"target_modules": ".*q", "layers_to_transform": 0}, "`layers_to_transform` cannot be used"),
        ({"target_modules": ["q"], "layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DeloraConfig(**kwargs)


def test_json_roundtrip_dispatches_to_delora(tmp_path):
    DeloraConfig(r=6, delora_lambda=3, lambda_pattern={"v_proj": 7}, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is DeloraConfig
    assert (loaded.r, loaded.delora_lambda, loaded.lambda_pattern) == (6, 3, {"v_proj": 7})


def test_only_linear_layers_are_wrapped_and_the_model_is_left_unchanged():
    model = gpt2()
    with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
        get_peft_model(model, DeloraConfig(r=2, target_modules=["c_attn"]))
    assert not any(isinstance(m, DeloraLinear) for m in model.modules())


def test_quantized_linear_is_refused():
    model = quantize_model(llama(), QuantizationConfig(load_in_4bit=True))
    with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
        get_peft_model(model, DeloraConfig(r=2, target_modules=["q_proj"]))


# ---------------------------------------------------------------------------------------------- the maths
def test_update_by_hand_and_its_norm_bound():
    layer = layer_of(DeloraConfig(r=3, delora_lambda=5, target_modules=["lin0"], init_weights=False))
    A, B = layer.delora_A["default"].detach(), layer.delora_B["default"].detach()
    assert A.shape == (3, 10) and B.shape == (8, 3) and layer.delora_lambda["default"].item() == 5.0
    w0 = layer.base_layer.weight.detach()
    w = w0.norm(dim=0)
    torch.testing.assert_close(layer.delora_w_norm["default"], w)
    delta = sum(5 / 3 * torch.outer(B[:, i], A[i]) / (A[i].norm() * B[:, i].norm()) for i in range(3)) * w
    x = torch.randn(4, 10)
    with torch.no_grad():
        prop.assert_close(layer.get_delta_weight("default"), delta)
        prop.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)
    # every rank-one term has unit norm: ||delta diag(1/w)||_F <= lambda
    assert float((delta / w).norm()) <= 5.0 + 1e-5


def test_default_init_is_a_noop_with_gradients_for_b():
    model = get_peft_model(MLP(), DeloraConfig(r=2, target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    assert torch.equal(layer.delora_B["default"], torch.zeros(8, 2))
    x = torch.randn(3, 10)
    prop.assert_close(model(x), MLP()(x))
    model(x).sum().backward()
    grad = layer.delora_B["default"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_column_norms_are_fixed_at_creation_and_saved(tmp_path):
    model = get_peft_model(MLP(), DeloraConfig(r=2, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    saved_norms = layer.delora_w_norm["default"].clone()
    keys = sorted(k.removeprefix("base_model.model.") for k in get_peft_model_state_dict(model))
    assert keys == ["lin0.delora_A", "lin0.delora_B", "lin0.delora_lambda", "lin0.delora_w_norm"]
    assert not layer.delora_w_norm["default"].requires_grad
    model.save_pretrained(str(tmp_path))
    other = MLP()
    with torch.no_grad():
        other.lin0.weight.mul_(3.0)  # a base whose norms differ: the saved norms must win
    loaded = PeftModel.from_pretrained(other, str(tmp_path))
    torch.testing.assert_close(loaded.base_model.model.lin0.delora_w_norm["default"], saved_norms)


def test_rank_and_lambda_patterns():
    config = DeloraConfig(r=2, delora_lambda=4, target_modules=["lin0", "lin1"],
                          rank_pattern={"lin1": 3}, lambda_pattern={"lin0": 9})
    model = get_peft_model(MLP(), config).base_model.model
    assert (model.lin0.r["default"], model.lin1.r["default"]) == (2, 3)
    assert (model.lin0.delora_lambda["default"].item(), model.lin1.delora_lambda["default"].item()) == (9.0, 4.0)


def test_dropout_only_in_training():
    layer = layer_of(DeloraConfig(r=2, target_modules=["lin0"], init_weights=False, module_dropout=0.5))
    assert isinstance(layer.delora_dropout["default"], nn.Dropout)
    x = torch.randn(64, 10)
    with torch.no_grad():
        layer.eval()
        first = layer(x)
        prop.assert_close(layer(x), first)
        layer.train()
        assert not torch.allclose(layer(x), first)


@pytest.mark.parametrize(
    "bias, trained, saved",
    [("none", set(), set()), ("all", {"lin0", "lin1"}, {"lin0.base_layer.bias", "lin1.bias"}),
     ("delora_only", {"lin0"}, {"lin0.base_layer.bias"})],
)
def test_bias_options_train_and_save_biases(bias, trained, saved):
    model = get_peft_model(MLP(), DeloraConfig(r=2, target_modules=["lin0"], bias=bias))
    names = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert names == trained
    keys = {key.removeprefix("base_model.model.") for key in get_peft_model_state_dict(model)}
    assert keys == {"lin0.delora_A", "lin0.delora_B", "lin0.delora_lambda", "lin0.delora_w_norm"} | saved


def test_two_adapters_merged_and_unmerged():
    model = get_peft_model(MLP(), DeloraConfig(r=2, target_modules=["lin0"], init_weights=False))
    model.add_adapter("other", DeloraConfig(r=5, target_modules=["lin0", "lin1"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 10)
    with torch.no_grad():
        both = model(x)
        model.merge_adapter()
        prop.assert_close(model(x), both)
        model.unmerge_adapter()
        prop.assert_close(model(x), both)


def test_bf16_base_keeps_fp32_adapter_and_norms():
    base = MLP().to(torch.bfloat16)
    layer = get_peft_model(base, DeloraConfig(r=2, target_modules=["lin0"], init_weights=False)).base_model.model.lin0
    assert layer.delora_A["default"].dtype == torch.float32
    assert layer.delora_w_norm["default"].dtype == torch.float32
    out = layer(torch.randn(3, 10, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 2, "target_modules": TARGETS[name][:1]},
    train=({"init_weights": True}, {"init_weights": False}),
    lr=2e-2,
))


