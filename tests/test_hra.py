"""HRA: config checks, the Householder maths, each layer kind by hand, several adapters, biases,
quantized bases, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from peftkit import ConfigError, HRAConfig, PeftConfig, PeftModel, TargetModulesError, get_peft_model
from peftkit.quantization import Linear4bit, Linear8bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.hra import householder
from peftkit.tuners.hra.layer import HRAConv2d, HRALinear
from peftkit.tuners.hra.model import HRA_TARGET_MODULES_BY_MODEL_TYPE
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> HRAConfig:
    """r=4, random vectors (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(r=4, target_modules=TARGETS[name], init_weights=False)
    kwargs["task_type"] = MODEL_FACTORIES[name].task_type
    kwargs.update(overrides)
    return HRAConfig(**kwargs)


def reflection_chain(u: torch.Tensor) -> torch.Tensor:
    """H = prod_i (I - 2 v_i v_i^T), multiplied out reflection by reflection (the definition)."""
    h = torch.eye(u.shape[0], dtype=u.dtype)
    for column in u.T:
        v = (column / column.norm()).unsqueeze(1)
        h = h @ (torch.eye(u.shape[0], dtype=u.dtype) - 2 * v @ v.T)
    return h


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns by (modified) Gram-Schmidt, the textbook way."""
    basis: list[torch.Tensor] = []
    for column in u.T:
        for q in basis:
            column = column - (q @ column) * q
        basis.append(column / column.norm())
    return torch.stack(basis, dim=1)


class Net(nn.Module):
    """Linear layers and a padded, strided 3x3 Conv2d (whose input is larger than the kernel)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(12, 16)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin0(x))).mean(1) + self.conv(img).mean((2, 3)).sum(1, keepdim=True)


def net_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(2, 5, 12, generator=generator), torch.randn(2, 3, 7, 7, generator=generator)


def wrap_net(**overrides) -> PeftModel:
    kwargs = dict(target_modules=["lin0", "conv", "head"], r=4, init_weights=False)
    kwargs.update(overrides)
    return get_peft_model(Net(), HRAConfig(**kwargs)).eval()


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = [f.name for f in dataclasses.fields(HRAConfig)]
    theirs = {f.name: f for f in dataclasses.fields(peft.HRAConfig)}
    assert ours == list(theirs)
    for field in dataclasses.fields(HRAConfig):
        if field.name != "peft_type":
            assert field.default == theirs[field.name].default, field.name


def test_default_targets_are_peft_table():
    constants = pytest.importorskip("peft.utils.constants")
    assert HRA_TARGET_MODULES_BY_MODEL_TYPE == dict(constants.TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING)
    model = get_peft_model(llama(), HRAConfig(task_type="CAUSAL_LM"))
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"r": -2}, "r=-2 is invalid"),
        ({"r": 2.0}, "r=2.0 is invalid"),
        ({"r": True}, "r=True is invalid"),
        ({"apply_GS": 1}, "apply_GS=1 is invalid"),
        ({"init_weights": "random"}, "init_weights='random' is invalid"),
        ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"target_modules": "q_proj", "layers_to_transform": [0]}, "regex"),
        ({"target_modules": [1]}, "strings"),
        ({"peft_type": "LORA"}, "must be 'HRA'"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HRAConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_json_roundtrip_dispatches_to_hra(tmp_path):
    config = HRAConfig(r=6, apply_GS=True, bias="hra_only", target_modules=["q_proj"])
    config.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is HRAConfig
    assert (loaded.r, loaded.apply_GS, loaded.bias, loaded.target_modules) == (6, True, "hra_only", {"q_proj"})


# ---------------------------------------------------------------------------------------------- maths
@pytest.mark.parametrize("shape", [(12, 4), (16, 16), (6, 9)])
def test_compact_form_equals_the_reflection_chain(shape):
    u = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v, t = householder.compact_factors(u, apply_gs=False)
    h = reflection_chain(u)
    prop.assert_close(householder.dense(v, t), h, atol=1e-10)
    prop.assert_close(householder.dense(v, t, transpose=True), h.T, atol=1e-10)
    prop.assert_close(h @ h.T, torch.eye(shape[0], dtype=u.dtype), atol=1e-10)
    rows = torch.randn(3, 2, shape[0], dtype=u.dtype)
    prop.assert_close(householder.reflect_rows(rows, v, t), rows @ h, atol=1e-10)
    prop.assert_close(householder.reflect_rows(rows, v, t, transpose=True), rows @ h.T, atol=1e-10)


def test_gram_schmidt_form_is_one_reflection_of_the_span():
    u = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v, t = householder.compact_factors(u, apply_gs=True)
    q = gram_schmidt(u)
    prop.assert_close(householder.dense(v, t), torch.eye(10, dtype=u.dtype) - 2 * q @ q.T, atol=1e-10)


def test_paired_columns_cancel_and_factors_compute_in_float32():
    half = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    v, t = householder.compact_factors(torch.repeat_interleave(half, 2, dim=1), apply_gs=False)
    prop.assert_close(householder.dense(v, t), torch.eye(8))
    v, _ = householder.compact_factors(half.to(torch.bfloat16), apply_gs=False)
    assert v.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- layers
def test_linear_reflects_the_input_and_merges_into_the_weight():
    model = wrap_net()
    layer = model.base_model.model.lin0
    assert isinstance(layer, HRALinear) and layer.hra_u["default"].shape == (12, 4)
    h = reflection_chain(layer.hra_u["default"].detach().double()).float()
    x = net_inputs()[0]
    with torch.no_grad():
        expected = nn.functional.linear(x, layer.base_layer.weight @ h, layer.base_layer.bias)
        prop.assert_close(layer(x), expected)
        prop.assert_differs(layer(x), layer.base_layer(x))
        prop.assert_close(layer.get_delta_weight("default"), h)
        prop.assert_close(layer.get_delta_weight("default", reverse=True), h.T)
        layer.merge()
        prop.assert_close(layer.base_layer.weight, Net().lin0.weight @ h)
        prop.assert_close(layer(x), expected)
        layer.unmerge()
        prop.assert_close(layer.base_layer.weight, Net().lin0.weight)


def test_conv2d_reflects_each_receptive_field():
    model = wrap_net()
    layer = model.base_model.model.conv
    assert isinstance(layer, HRAConv2d) and layer.hra_u["default"].shape == (3 * 3 * 3, 4)
    base = layer.base_layer
    h = reflection_chain(layer.hra_u["default"].detach().double()).float()
    kernel = (base.weight.reshape(4, -1) @ h).reshape(base.weight.shape)
    img = net_inputs()[1]
    with torch.no_grad():
        expected = nn.functional.conv2d(img, kernel, base.bias, stride=2, padding=1)
        prop.assert_close(layer(img), expected)
        prop.assert_differs(layer(img), base(img))


def test_forward_never_forms_a_dense_reflection(monkeypatch):
    model = wrap_net()

    def refuse(*args, **kwargs):
        raise AssertionError("forward built the dense d x d matrix")

    monkeypatch.setattr(householder, "dense", refuse)
    with torch.no_grad():
        model(*net_inputs())


def test_symmetric_init_is_identity_and_odd_rank_warns():
    model = get_peft_model(Net(), HRAConfig(target_modules=["lin0", "conv"], r=4))
    u = model.base_model.model.lin0.hra_u["default"]
    assert torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 2], u[:, 3]) and not torch.equal(u[:, 0], u[:, 2])
    with torch.no_grad():
        prop.assert_close(model(*net_inputs()), Net()(*net_inputs()))
    with pytest.warns(UserWarning, match="The symmetric initialization can NOT be performed when r is odd!"):
        odd = get_peft_model(Net(), HRAConfig(target_modules=["lin0"], r=3))
    with torch.no_grad():
        prop.assert_differs(odd(*net_inputs()), Net()(*net_inputs()))


@pytest.mark.parametrize("apply_GS", [False, True])
def test_two_active_adapters_on_one_layer_merge_like_they_run(apply_GS):
    model = wrap_net(apply_GS=apply_GS)
    model.add_adapter("other", HRAConfig(target_modules=["lin0", "conv"], r=2, init_weights=False, apply_GS=apply_GS))
    model.base_model.set_adapter(["default", "other"])
    inputs = net_inputs()
    with torch.no_grad():
        both = model(*inputs)
        model.base_model.set_adapter("default")
        only_default = model(*inputs)
        model.base_model.set_adapter(["default", "other"])
        prop.assert_differs(both, only_default)
        model.merge_adapter()
        prop.assert_close(model(*inputs), both)
        model.unmerge_adapter()
        prop.assert_close(model(*inputs), both)
        for _, layer in model.base_model.tuner_layers():
            prop.assert_close(layer.get_base_layer().weight, getattr(Net(), layer_name(model, layer)).weight)


def layer_name(model: PeftModel, layer: nn.Module) -> str:
    return next(name for name, module in model.base_model.model.named_children() if module is layer)


def test_net_merge_unmerge_disable_save_load(tmp_path):
    model = wrap_net(apply_GS=True)
    inputs = net_inputs()
    with torch.no_grad():
        adapted, base_out = model(*inputs), Net()(*inputs)
        prop.assert_differs(adapted, base_out)
        with model.disable_adapter():
            prop.assert_close(model(*inputs), base_out)
        model.save_pretrained(str(tmp_path))
        loaded = PeftModel.from_pretrained(Net(), str(tmp_path))
        prop.assert_close(loaded(*inputs), adapted, atol=0)
        prop.assert_close(model.merge_and_unload()(*inputs), adapted)


def test_delete_adapter_leaves_no_per_adapter_state():
    model = wrap_net()
    model.add_adapter("other", HRAConfig(target_modules=["lin0"], r=2))
    model.delete_adapter("other")
    for _, layer in model.base_model.tuner_layers():
        containers = {**vars(layer), **layer._modules}
        dangling = [name for name, value in containers.items()
                    if isinstance(value, (dict, nn.ModuleDict, nn.ParameterDict)) and "other" in value]
        assert not dangling, dangling
        assert "default" in layer.hra_u


def test_half_precision_base_keeps_fp32_adapter_and_merges():
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "hra_u" in n)
    inputs = lm_inputs()
    with torch.no_grad():
        unmerged = model(**inputs).logits
        assert unmerged.dtype == torch.bfloat16
        model.merge_adapter()
        merged = model(**inputs).logits.float()
    assert (merged - unmerged.float()).abs().mean() < 0.02 * unmerged.float().abs().mean()


def test_gradients_reach_every_vector():
    model = wrap_net(apply_GS=True)
    model.train()
    model(*net_inputs()).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "hra_u" in n]
    assert len(grads) == 3 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------- refusals, warnings
def test_gpt2_conv1d_is_not_supported_as_in_peft():
    with pytest.raises(TargetModulesError, match="Conv1D.*Supported: torch.nn.Linear, torch.nn.Conv2d"):
        get_peft_model(gpt2(), HRAConfig(target_modules=["c_attn"]))


def test_grouped_conv_is_refused_and_model_unchanged():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TargetModulesError, match="groups=2"):
        get_peft_model(model, HRAConfig(target_modules=["0"]))
    assert type(model[0]) is nn.Conv2d


def test_scaling_is_not_supported_and_warns():
    layer = wrap_net().base_model.model.lin0
    with pytest.warns(UserWarning, match="Scaling operation for HRA not supported"):
        layer.scale_layer(2.0)
    with pytest.warns(UserWarning, match="Unscaling operation for HRA not supported"):
        layer.unscale_layer()


@pytest.mark.parametrize("bias", ["all", "hra_only"])
def test_bias_training_and_saving(bias, tmp_path):
    model = get_peft_model(Net(), HRAConfig(target_modules=["lin0"], r=2, bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.lin0.base_layer.bias" in trainable
    assert ("base_model.model.head.bias" in trainable) is (bias == "all")
    with torch.no_grad():
        model.base_model.model.lin0.base_layer.bias.fill_(1.5)
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lin0.base_layer.bias" in saved and "base_model.model.lin0.hra_u" in saved
    loaded = PeftModel.from_pretrained(Net(), str(tmp_path))
    assert torch.all(loaded.base_model.model.lin0.base_layer.bias == 1.5)
    with pytest.raises(ConfigError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", HRAConfig(target_modules=["lin0"], r=2, bias="all"))


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_base_matches_dequantized_reference_and_merges(quant):
    settings = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "int8": {"load_in_8bit": True}}[quant]
    inputs = lm_inputs()
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(**settings)), config_for("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, HRALinear) and isinstance(layer.get_base_layer(), (Linear4bit, Linear8bit))
    reference = get_peft_model(
        dequantize_model(quantize_model(llama(), QuantizationConfig(**settings)), torch.float32), config_for("llama")
    )
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "hra_u" in k}, strict=False)
    with torch.no_grad():
        got, expected = model(**inputs).logits, reference(**inputs).logits
        prop.assert_close(got, expected, atol=1e-4)
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        merged = model(**inputs).logits
        one_rounding = quantize_model(llama(), QuantizationConfig(**settings))(**inputs).logits - llama()(**inputs).logits
    # A reflection moves every weight off the code grid: merging costs about one more quantization.
    assert (merged - got).abs().mean() < 2 * one_rounding.abs().mean()


def test_quantized_base_trains_only_the_vectors():
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(load_in_4bit=True)), config_for("llama", init_weights=True))
    base = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    codes = base.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**lm_inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(base.weight, codes)


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 2, "apply_GS": True},
    lr=1e-2,
))


@pytest.mark.parametrize(
    "overrides",
    [{"apply_GS": True}, {"r": 5}, {"layers_to_transform": [1], "layers_pattern": "layers"}],
    ids=["gram-schmidt", "odd-r", "layers"],
)
def test_llama_variants(overrides, tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    config = config_for("llama", **overrides)
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config)
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config, tmp_path)
    assert math.isfinite(get_peft_model(tiny.make_model(), config)(**tiny.make_inputs()).loss.item())
