"""SHiRA: config checks, the sparse update by hand, masks (seeded, custom), merging, quantized bases,
checkpoint positions, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from peftkit import (
    ConfigError,
    PeftConfig,
    PeftModel,
    ShiraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.quantization import Linear4bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.shira import random_mask
from peftkit.tuners.shira.layer import Linear as ShiraLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> ShiraConfig:
    """Rank 2, random values (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(r=2, target_modules=TARGETS[name], init_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return ShiraConfig(**kwargs)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 4)
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def dense_update(layer: ShiraLinear, name: str = "default") -> torch.Tensor:
    """S built entry by entry from the saved positions and values."""
    update = torch.zeros(layer.out_features, layer.in_features)
    rows, cols = layer.shira_indices[name].tolist()
    for k, (row, col) in enumerate(zip(rows, cols)):
        update[row, col] += float(layer.shira_weight[name][k]) * layer.scaling[name]
    return update


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f.default for f in dataclasses.fields(ShiraConfig) if f.name != "mask_fn"}  # run time only
    theirs = {f.name: f.default for f in dataclasses.fields(peft.ShiraConfig)}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "peft_type"} == {k: v for k, v in theirs.items() if k != "peft_type"}
    assert ShiraConfig().mask_fn is random_mask


@pytest.mark.parametrize(
    "kwargs, message",
    [({"r": 0}, "r=0 is invalid"), ({"r": 1.5}, "r=1.5 is invalid"), ({"random_seed": "x"}, "random_seed='x'"),
     ({"fan_in_fan_out": "yes"}, "fan_in_fan_out='yes' is invalid"), ({"target_modules": [1]}, "strings")],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ShiraConfig(**kwargs)


def test_unknown_mask_type_warns_and_needs_a_mask_fn():
    with pytest.warns(UserWarning, match="supply your own masking function"):
        config = ShiraConfig(mask_type="mine")
    assert config.mask_fn is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ShiraConfig(mask_type="mine", inference_mode=True).mask_fn is None  # no warning when loading


def test_json_roundtrip_dispatches_to_shira(tmp_path):
    ShiraConfig(r=3, random_seed=7, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is ShiraConfig
    assert (loaded.r, loaded.random_seed, loaded.target_modules, loaded.mask_fn) == (3, 7, {"q_proj"}, random_mask)
    assert "mask_fn" not in loaded.to_dict()


def test_default_targets_are_query_value():
    model = get_peft_model(llama(), ShiraConfig(r=2))
    assert sorted({key.rpartition(".")[2] for key, _ in model.base_model.tuner_layers()}) == ["q_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------- the maths
def test_update_is_sparse_with_r_times_in_plus_out_entries():
    model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    assert type(layer) is ShiraLinear
    assert layer.shira_weight["default"].shape == (30,) and layer.shira_indices["default"].shape == (2, 30)
    assert layer.shira_indices["default"].dtype == torch.int32
    positions = {tuple(p) for p in layer.shira_indices["default"].T.tolist()}
    assert len(positions) == 30  # distinct positions
    x = torch.randn(4, 10)
    with torch.no_grad():
        update = dense_update(layer)
        prop.assert_close(layer.get_delta_weight("default"), update)
        prop.assert_close(layer(x), layer.base_layer(x) + x @ update.T)
    assert int((update != 0).sum()) == 30


def test_init_true_is_zero_and_false_is_random():
    zero = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"])).base_model.model.lin0
    assert torch.equal(zero.shira_weight["default"], torch.zeros(30))
    rand = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"], init_weights=False)).base_model.model.lin0
    assert float(rand.shira_weight["default"].abs().min()) > 0


def test_random_mask_is_seeded_and_default_seed_is_fixed():
    base = nn.Linear(8, 6)
    assert torch.equal(random_mask(base, 1), random_mask(base, 1))  # fixed default generator seed
    assert torch.equal(random_mask(base, 1, random_seed=3), random_mask(base, 1, random_seed=3))
    assert not torch.equal(random_mask(base, 1, random_seed=3), random_mask(base, 1, random_seed=4))
    mask = random_mask(base, 2, random_seed=3)
    assert mask.shape == (6, 8) and int(mask.sum()) == 2 * (6 + 8)


def test_custom_mask_fn_is_used_and_kept_by_the_model():
    def first_rows(base_layer, r, **kwargs):
        mask = torch.zeros_like(base_layer.weight)
        mask.view(-1)[: r * (base_layer.in_features + base_layer.out_features)] = 1
        return mask

    with pytest.warns(UserWarning, match="not recognized"):
        config = ShiraConfig(r=1, mask_type="first", target_modules=["lin0"], init_weights=False)
    config.mask_fn = first_rows
    layer = get_peft_model(Net(), config).base_model.model.lin0
    rows, cols = layer.shira_indices["default"].tolist()
    assert rows == [0] * 10 + [1] * 10 + [2] * 10 and cols == list(range(10)) * 3


def test_mask_with_wrong_count_and_too_large_rank_are_refused():
    config = ShiraConfig(r=1, target_modules=["lin0"])
    config.mask_fn = lambda base_layer, r, **kwargs: torch.ones_like(base_layer.weight)
    with pytest.raises(ValueError, match="not the same dimensions"):
        get_peft_model(Net(), config)
    with pytest.raises(ValueError, match="more shira params than the total number"):
        get_peft_model(Net(), ShiraConfig(r=7, target_modules=["lin0"]))  # 7 * 30 > 200


def test_unsupported_layers_raise_type_error():
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(Net(), ShiraConfig(r=1, target_modules=["conv"]))
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(gpt2(), ShiraConfig(r=1, target_modules=["c_attn"]))  # Conv1D, as peft


def test_fan_in_fan_out_on_linear_warns_as_peft():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"], fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is False


def test_set_scale_scales_the_update():
    model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    x = torch.randn(3, 10)
    with torch.no_grad():
        full = layer(x) - layer.base_layer(x)
        layer.set_scale("default", 0.5)
        prop.assert_close(layer(x) - layer.base_layer(x), 0.5 * full)
    layer.set_scale("missing", 2.0)  # ignored, as peft
    assert layer.scaling == {"default": 0.5}


def test_hooked_base_is_called_and_gives_the_same_output():
    model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    x = torch.randn(3, 10)
    calls = []
    with torch.no_grad():
        fused = layer(x)
        handle = layer.base_layer.register_forward_hook(lambda *_: calls.append(1))
        separate = layer(x)
        handle.remove()
    assert calls == [1]
    prop.assert_close(fused, separate)


def test_gradients_reach_only_the_values():
    model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"]))
    model(torch.randn(5, 10)).sum().backward()
    layer = model.base_model.model.lin0
    assert layer.shira_weight["default"].grad is not None and layer.base_layer.weight.grad is None
    assert not layer.shira_indices["default"].requires_grad


# ---------------------------------------------------------------------------------------------- merging
def test_two_adapters_merge_add_and_unmerge_restores():
    model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"], init_weights=False))
    model.add_adapter("other", ShiraConfig(r=2, random_seed=5, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    w0 = layer.base_layer.weight.detach().clone()
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(3, 10)
    with torch.no_grad():
        both = layer(x)
        model.merge_adapter()
        expected = w0 + dense_update(layer, "default") + dense_update(layer, "other")
        prop.assert_close(layer.base_layer.weight, expected)
        prop.assert_close(layer(x), both)
        model.unmerge_adapter()
    prop.assert_close(layer.base_layer.weight, w0, atol=1e-6)


def test_safe_merge_refuses_nan_and_keeps_weights():
    model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.shira_weight["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_values_and_positions_and_positions_load(tmp_path):
    model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"], init_weights=False, random_seed=11))
    x = torch.randn(3, 10)
    expected = model(x).detach()
    state = get_peft_model_state_dict(model)
    assert sorted(state) == ["base_model.model.lin0.shira_indices", "base_model.model.lin0.shira_weight"]
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(Net(), str(tmp_path))
    prop.assert_close(loaded(x), expected, atol=0)
    # positions come from the file, not from a fresh mask: a changed seed in the config does not matter
    config = ShiraConfig.from_pretrained(str(tmp_path))
    assert config.random_seed == 11
    other = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"], random_seed=12))
    before = other.base_model.model.lin0.shira_indices["default"].clone()
    result = set_peft_model_state_dict(other, state)
    assert not result.missing_keys and not result.unexpected_keys
    after = other.base_model.model.lin0.shira_indices["default"]
    assert not torch.equal(before, after) and torch.equal(after, state["base_model.model.lin0.shira_indices"])
    prop.assert_close(other(x), expected)


def test_indices_are_not_in_the_module_state_dict_and_follow_the_device():
    model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"]))
    assert not any("shira_indices" in key for key in model.state_dict())
    model.to(torch.float64)
    assert model.base_model.model.lin0.shira_indices["default"].dtype == torch.int32


def test_delete_adapter_drops_values_and_positions():
    model = get_peft_model(Net(), ShiraConfig(r=1, target_modules=["lin0"]))
    model.add_adapter("other", ShiraConfig(r=1, target_modules=["lin0"]))
    model.delete_adapter("other")
    layer = model.base_model.model.lin0
    assert list(layer.shira_weight) == ["default"] and list(layer.shira_indices) == ["default"]
    assert list(layer.scaling) == ["default"]


# ---------------------------------------------------------------------------------------------- quantized bases
def test_quantized_base_matches_dequantized_reference():
    inputs = lm_inputs()
    config = ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM")
    quant = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    torch.manual_seed(5)
    model = get_peft_model(quantize_model(llama(), quant), config)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert type(layer) is ShiraLinear and isinstance(layer.get_base_layer(), Linear4bit)
    reference = get_peft_model(dequantize_model(quantize_model(llama(), quant), torch.float32), config)
    assert not set_peft_model_state_dict(reference, get_peft_model_state_dict(model)).unexpected_keys
    got = prop.output_of(model, inputs)
    prop.assert_close(got, prop.output_of(reference, inputs), atol=1e-4)
    with model.disable_adapter():
        base_logits = prop.output_of(model, inputs)
    prop.assert_differs(base_logits, got)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    merged = prop.output_of(model, inputs)  # re-quantized: near the adapted output, not exact
    assert float((merged - got).abs().mean()) < 0.5 * float((base_logits - got).abs().mean())


# ---------------------------------------------------------------------------------------------- properties
CASES = list(TARGETS)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 3, "target_modules": TARGETS[name][:1], "random_seed": 3},
))


