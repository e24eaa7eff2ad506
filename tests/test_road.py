"""RoAd: config checks, the pairwise rotation by hand, variants, merging, mixed-adapter batches,
quantized bases, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftkit import ConfigError, PeftConfig, PeftModel, RoadConfig, TargetModulesError, get_peft_model
from peftkit.errors import AdapterStateError
from peftkit.quantization import Linear4bit, Linear8bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.road import rotation
from peftkit.tuners.road.layer import Linear as RoadLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> RoadConfig:
    """Groups of 8, random angles and scales (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(group_size=8, target_modules=TARGETS[name], init_weights=False)
    kwargs["task_type"] = MODEL_FACTORIES[name].task_type
    kwargs.update(overrides)
    return RoadConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


def mlp_inputs() -> torch.Tensor:
    return torch.randn(6, 3, 6, generator=torch.Generator().manual_seed(2))


def two_adapter_mlp(**second) -> PeftModel:
    torch.manual_seed(3)
    model = get_peft_model(MLP(), RoadConfig(target_modules=["lin0", "lin1"], group_size=4, init_weights=False))
    model.add_adapter("other", RoadConfig(**{"target_modules": ["lin0"], "group_size": 2, "init_weights": False,
                                             "variant": "road_2", **second}))
    return model.eval()


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(RoadConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.RoadConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "road_3"}, "Invalid variant road_3 specified. Please choose from road_1, road_2 or road_4"),
        ({"group_size": 3}, "The group_size must be divisible by 2 when using RoadLayer, but got 3"),
        ({"group_size": 0}, "but got 0"),
        ({"group_size": -4}, "but got -4"),
        ({"group_size": 4.0}, "but got 4.0"),
        ({"group_size": True}, "but got True"),
        ({"group_size": 2**40}, "larger than any tensor dimension"),
        ({"init_weights": "yes"}, "init_weights='yes' is invalid"),
        ({"target_modules": [1]}, "strings"),
        ({"modules_to_save": 3}, "modules_to_save=3 is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RoadConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_json_roundtrip_dispatches_to_road(tmp_path):
    config = RoadConfig(variant="road_4", group_size=16, init_weights=False, target_modules=["q_proj"])
    config.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is RoadConfig
    assert (loaded.variant, loaded.group_size, loaded.init_weights) == ("road_4", 16, False)
    assert loaded.target_modules == {"q_proj"}


def test_group_size_must_divide_out_features():
    with pytest.raises(ConfigError, match=r"divisible by group_size \(16\).*out_features=8"):
        get_peft_model(MLP(), RoadConfig(target_modules=["lin0"], group_size=16))


def test_conv1d_and_embeddings_are_refused_as_in_peft():
    with pytest.raises(TargetModulesError, match="RoAd cannot wrap"):
        get_peft_model(gpt2(), RoadConfig(target_modules=["c_attn"], group_size=8))
    model = llama()
    with pytest.raises(TargetModulesError, match="Embedding"):
        get_peft_model(model, RoadConfig(target_modules=["embed_tokens"], group_size=8))
    assert type(model.model.embed_tokens) is nn.Embedding  # nothing was changed


# ---------------------------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("variant, size", [("road_1", 4), ("road_2", 8), ("road_4", 16)])
def test_parameter_sizes_and_identity_init(variant, size):
    layer = get_peft_model(MLP(), RoadConfig(target_modules=["lin0"], group_size=4, variant=variant)).base_model.model.lin0
    assert type(layer) is RoadLinear
    assert layer.road_theta["default"].shape == layer.road_alpha["default"].shape == (size,)
    assert torch.equal(layer.road_theta["default"], torch.zeros(size))
    assert torch.equal(layer.road_alpha["default"], torch.ones(size))


def test_road_1_rotates_each_pair_by_hand():
    """group 4: pairs (0, 2), (1, 3), (4, 6), (5, 7); one angle and scale per pair."""
    model = get_peft_model(MLP(), RoadConfig(target_modules=["lin0"], group_size=4))
    layer = model.base_model.model.lin0
    theta, alpha = torch.tensor([0.3, -1.0, 2.0, 0.5]), torch.tensor([1.5, 0.5, 1.0, 2.0])
    layer.road_theta["default"].data.copy_(theta)
    layer.road_alpha["default"].data.copy_(alpha)
    x = torch.randn(5, 6)
    with torch.no_grad():
        y = layer.base_layer(x)
        got = layer(x)
    for pair, (i, j) in enumerate([(0, 2), (1, 3), (4, 6), (5, 7)]):
        c, s = alpha[pair] * torch.cos(theta[pair]), alpha[pair] * torch.sin(theta[pair])
        prop.assert_close(got[:, i], c * y[:, i] - s * y[:, j])
        prop.assert_close(got[:, j], s * y[:, i] + c * y[:, j])


def test_road_4_uses_separate_cos_and_sin_halves():
    theta = torch.randn(16, generator=torch.Generator().manual_seed(0))
    alpha = torch.randn(16, generator=torch.Generator().manual_seed(1))
    f, s = rotation.rotation_coefficients("road_4", 4, theta, alpha)
    # group g: theta[8g : 8g+4] drive the cos terms, theta[8g+4 : 8g+8] the sin terms
    prop.assert_close(f, torch.cat([alpha[0:4] * theta[0:4].cos(), alpha[8:12] * theta[8:12].cos()]))
    prop.assert_close(s, torch.cat([alpha[4:8] * theta[4:8].sin(), alpha[12:16] * theta[12:16].sin()]))


@pytest.mark.parametrize("variant, size", [("road_1", 6), ("road_2", 12), ("road_4", 24)])
def test_inverse_coefficients_invert_the_dense_rotation(variant, size):
    generator = torch.Generator().manual_seed(4)
    theta, alpha = torch.randn(size, generator=generator), 1 + 0.3 * torch.randn(size, generator=generator)
    f, s = rotation.rotation_coefficients(variant, 4, theta.double(), alpha.double())
    inverse = rotation.dense_rotation(*rotation.inverse_coefficients(f, s, 4), 4)
    prop.assert_close(inverse @ rotation.dense_rotation(f, s, 4), torch.eye(12, dtype=torch.float64))


def test_singular_rotation_cannot_be_unmerged_and_stays_merged():
    model = get_peft_model(MLP(), RoadConfig(target_modules=["lin0"], group_size=4))
    layer = model.base_model.model.lin0
    layer.road_alpha["default"].data[0] = 0.0
    model.merge_adapter()
    merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(AdapterStateError, match="singular"):
        model.unmerge_adapter()
    assert layer.merged and torch.equal(layer.base_layer.weight, merged)


def test_merge_rotates_weight_and_bias():
    model = get_peft_model(MLP(), RoadConfig(target_modules=["lin0"], group_size=4, variant="road_2", init_weights=False))
    layer = model.base_model.model.lin0
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    dense = rotation.dense_rotation(*[t.detach() for t in layer.coefficients("default")], 4)
    layer.merge()
    prop.assert_close(layer.base_layer.weight, dense @ weight)
    prop.assert_close(layer.base_layer.bias, dense @ bias)
    layer.unmerge()
    prop.assert_close(layer.base_layer.weight, weight)
    prop.assert_close(layer.base_layer.bias, bias)


def test_forward_never_forms_the_dense_rotation(monkeypatch):
    model = get_peft_model(MLP(), RoadConfig(target_modules=["lin0"], group_size=4, init_weights=False))
    monkeypatch.setattr(rotation, "dense_rotation", lambda *a: pytest.fail("dense R formed"))
    monkeypatch.setattr(torch.linalg, "inv", lambda *a: pytest.fail("dense inverse formed"))
    x = mlp_inputs()
    with torch.no_grad():
        out = model(x)
        model.merge_adapter()
        prop.assert_close(model(x), out)
        model.unmerge_adapter()


def test_two_active_adapters_compose_like_their_merge():
    model = two_adapter_mlp()
    x = mlp_inputs()
    with torch.no_grad():
        only_default = model(x)
        model.base_model.set_adapter(["default", "other"])
        both = model(x)
        prop.assert_differs(both, only_default)
        model.merge_adapter()
        prop.assert_close(model(x), both)
        model.unmerge_adapter()
        prop.assert_close(model(x), both)


# ---------------------------------------------------------------------------------------------- mixed batches
def test_mixed_batch_matches_each_adapter_alone():
    model = two_adapter_mlp()
    x = mlp_inputs()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        first = model(x)
        model.set_adapter("other")
        other = model(x)
        names = ["__base__", "default", "other"] * 2
        mixed = model(x, adapter_names=names)
    prop.assert_differs(first, other)
    prop.assert_close(mixed[0::3], base[0::3])
    prop.assert_close(mixed[1::3], first[1::3])
    prop.assert_close(mixed[2::3], other[2::3])


def test_mixed_batch_with_2d_inputs_and_repeated_rows():
    model = two_adapter_mlp()
    x = mlp_inputs()[:, 0]  # (6, 6): no token dimension
    with torch.no_grad():
        first = model(x)
        mixed = model(x, adapter_names=["default", "__base__", "default"])  # each name covers 2 rows
        with model.disable_adapter():
            base = model(x)
    prop.assert_close(mixed[0:2], first[0:2])
    prop.assert_close(mixed[2:4], base[2:4])
    prop.assert_close(mixed[4:6], first[4:6])


@pytest.mark.parametrize(
    "prepare, names, error, message",
    [
        (lambda m: m.train(), ["default"] * 6, ValueError, "Cannot pass `adapter_names` when the model is in training mode"),
        (lambda m: m.merge_adapter(["default"]), ["default"] * 6, ValueError, "there are merged adapters"),
        (lambda m: None, ["default", "nope"] * 3, ValueError, r"Trying to infer with non-existing adapter\(s\): nope"),
        (lambda m: None, ["default"] * 4, ValueError, "Length of `adapter_names` should be the same"),
    ],
)
def test_mixed_batch_errors(prepare, names, error, message):
    model = two_adapter_mlp()
    prepare(model)
    with pytest.raises(error, match=message):
        model(mlp_inputs(), adapter_names=names)


def test_disabled_adapters_win_over_adapter_names():
    model = two_adapter_mlp()
    x = mlp_inputs()
    with torch.no_grad(), model.disable_adapter():
        base = model(x)
        prop.assert_close(model(x, adapter_names=["default", "other", "__base__"] * 2), base)


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_base_matches_dequantized_reference_and_merges(quant):
    settings = {"nf4": {"load_in_4bit": True}, "int8": {"load_in_8bit": True}}[quant]
    config = RoadConfig(target_modules=["q_proj", "v_proj"], group_size=8, init_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(**settings)), config)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer.get_base_layer(), Linear4bit if quant == "nf4" else Linear8bit)
    torch.manual_seed(0)
    reference = get_peft_model(dequantize_model(quantize_model(llama(), QuantizationConfig(**settings))), config)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "road_" in k}, strict=False)
    inputs = lm_inputs()
    base = layer.get_base_layer()
    before = base.dequantize_weight(torch.float32)
    dense = rotation.dense_rotation(*[t.detach() for t in layer.coefficients("default")], 8)
    with torch.no_grad():
        got = model(**inputs).logits
        prop.assert_close(got, reference(**inputs).logits, atol=1e-4)
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
    # the merged codes are those of R W quantized the same way
    by_hand = nn.Linear(before.shape[1], before.shape[0], bias=False)
    by_hand.weight.data.copy_(dense @ before)
    settings_of = {"quant_type": base.quant_type, "double_quant": base.double_quant} if quant == "nf4" else {}
    expected = type(base).from_linear(by_hand, **settings_of).dequantize_weight(torch.float32)
    merged_weight = layer.get_base_layer().dequantize_weight(torch.float32)
    prop.assert_close(merged_weight, expected, atol=1e-6)
    assert not torch.allclose(merged_weight, before, atol=1e-3)


def test_quantized_base_trains_only_the_rotations():
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(load_in_4bit=True)),
                           RoadConfig(target_modules=["q_proj", "v_proj"], group_size=8, task_type="CAUSAL_LM"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".road_" in n for n in trainable)
    prop.check_training_lowers_loss(
        lambda: quantize_model(llama(), QuantizationConfig(load_in_4bit=True)), lm_inputs(),
        RoadConfig(target_modules=["q_proj", "v_proj"], group_size=8, task_type="CAUSAL_LM"), steps=10, lr=5e-2,
    )


def test_half_precision_base_keeps_fp32_adapter_and_merges():
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.road_theta["default"].dtype == torch.float32
    inputs = lm_inputs()
    with torch.no_grad():
        out = model(**inputs).logits
        assert out.dtype == torch.bfloat16
        model.merge_adapter()
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert (model(**inputs).logits.float() - out.float()).abs().max() < 0.1 * out.float().abs().max()


def test_delete_adapter_leaves_no_per_adapter_state():
    model = two_adapter_mlp()
    model.delete_adapter("other")
    layer = model.base_model.model.lin0
    for attr in layer.adapter_layer_names + layer.other_param_names:
        assert "other" not in getattr(layer, attr), attr


def test_checkpoint_keys_are_peft_s(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(MLP(), RoadConfig(target_modules=["lin0", "lin1"], group_size=4, variant="road_4"))
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == [f"base_model.model.{m}.road_{p}" for m in ("lin0", "lin1") for p in ("alpha", "theta")]


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"variant": "road_4", "group_size": 4},
    lr=1e-2,
))


@pytest.mark.parametrize("variant", ["road_2", "road_4"])
def test_llama_variants(variant, tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    config = config_for("llama", variant=variant, group_size=16)
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config)
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config, tmp_path)
