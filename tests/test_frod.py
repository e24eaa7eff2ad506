"""FRoD: config checks, the reconstruction `W = U diag(lambda_l) V^T` at init, the adapted weight by hand,
shared per-category bases and sparse patterns, checkpoints with and without projections, and the
shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, FrodConfig, PeftConfig, PeftModel, get_peft_model
from peftkit.tuners.frod.layer import FrodLayer
from peftkit.tuners.frod.model import category_from_key, layer_index_from_key, shared_basis, sparse_pattern
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]}


def config_for(name: str, **overrides) -> FrodConfig:
    """A random (non-identity) adapter on the case's targets, S with about 5% of its entries."""
    kwargs = dict(target_modules=TARGETS[name], init_weights=False, sparse_rate=0.05, progressbar=False,
                  task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return FrodConfig(**kwargs)


class MLP(nn.Module):
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
    ours = {f.name: f for f in dataclasses.fields(FrodConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.FrodConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    assert FrodConfig().sparse_rate == 0.01 and FrodConfig().save_projection is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparse_rate": 1.5}, "`sparse_rate` should be between 0 and 1, got 1.5"),
        ({"sparse_rate": -0.1}, "`sparse_rate` should be between 0 and 1"),
        ({"layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
        ({"frod_dropout": 1.0}, "frod_dropout=1.0 is invalid"),
        ({"bias": "lora_only"}, "bias='lora_only' is invalid"),
        ({"save_projection": "yes"}, "save_projection='yes' is invalid"),
        ({"regularization_alpha": float("nan")}, "regularization_alpha=nan is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FrodConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_json_roundtrip_dispatches_to_frod(tmp_path):
    FrodConfig(sparse_rate=0.2, projection_prng_key=3, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is FrodConfig
    assert (loaded.sparse_rate, loaded.projection_prng_key, loaded.target_modules) == (0.2, 3, {"q_proj"})


# ---------------------------------------------------------------------------------------------- categories
@pytest.mark.parametrize(
    "key, category",
    [
        ("lin0", "lin0"),
        ("model.layers.3.self_attn.q_proj", "self_attn_q_proj"),
        ("encoder.layer.0.attention.output.dense", "attention_output"),
        ("encoder.layer.0.output.dense", "output_dense"),
        ("transformer.h.1.c_proj", "c_proj"),
    ],
)
def test_category_from_key(key, category):
    assert category_from_key(key) == category


def test_layer_index_prefers_the_number_after_layers():
    assert layer_index_from_key("model.layers.3.self_attn.q_proj", 9) == 3
    assert layer_index_from_key("encoder.layer.11.attention.self.query", 9) == 11
    assert layer_index_from_key("classifier.dense", 9) == 9


def test_shared_basis_is_invertible_both_ways():
    torch.manual_seed(0)
    wide = [torch.randn(3, 8), torch.randn(2, 8)]  # 5 rows < 8: the SVD branch
    tall = [torch.randn(6, 4), torch.randn(6, 4)]  # 12 rows >= 4: QR + mean inverse
    for matrices, dim in ((wide, 8), (tall, 4)):
        basis = shared_basis(matrices, 1e-3)
        assert basis.shape == (dim, dim)
        assert torch.linalg.matrix_rank(basis) == dim


def test_sparse_pattern_is_off_diagonal_distinct_and_seeded():
    pattern = sparse_pattern(10, 0.2, torch.Generator().manual_seed(0))
    assert pattern.shape == (2, 20) and pattern.dtype == torch.long
    assert bool((pattern[0] != pattern[1]).all())
    assert len({tuple(p) for p in pattern.t().tolist()}) == 20
    assert torch.equal(pattern, sparse_pattern(10, 0.2, torch.Generator().manual_seed(0)))
    assert sparse_pattern(10, 0.001, torch.Generator().manual_seed(0)).shape == (2, 1)  # at least one
    assert sparse_pattern(10, 0.0, torch.Generator().manual_seed(0)).shape == (2, 0)


# ---------------------------------------------------------------------------------------------- the maths
def test_default_init_reconstructs_the_base_weight():
    model = get_peft_model(MLP(), FrodConfig(target_modules=["lin0", "lin1"], progressbar=False))
    for _, layer in model.base_model.tuner_layers():
        weight = layer.get_base_layer().weight
        rebuilt = layer.adapted_weight("default", weight.device, torch.float32)
        assert torch.allclose(rebuilt, weight, atol=1e-5)
        assert float(layer.get_delta_weight("default").abs().max()) < 1e-5
        assert not bool(layer.frod_lambda_s_values["default"].any())


def test_forward_is_the_adapted_weight_by_hand():
    model = get_peft_model(MLP(), FrodConfig(target_modules=["lin0"], init_weights=False, sparse_rate=0.1, progressbar=False))
    layer = model.base_model.model.lin0
    assert type(layer) is FrodLayer
    u, v = layer.frod_U["default"], layer.frod_V["default"]
    rows, cols = layer.frod_s_indices["default"]
    s = torch.zeros(10, 10)
    s[rows, cols] = layer.frod_lambda_s_values["default"].detach()
    adapted = u @ (s + torch.diag(layer.frod_lambda_l["default"].detach())) @ v.T
    x = torch.randn(3, 10)
    with torch.no_grad():
        prop.assert_close(layer(x), x @ adapted.T + layer.get_base_layer().bias)
        prop.assert_close(layer.get_delta_weight("default"), adapted - layer.get_base_layer().weight)
    assert layer.frod_lambda_s_values["default"].shape == (10,)  # int(100 * 0.1)
    assert layer.frod_lambda_l["default"].shape == (10,)


def test_layers_of_one_category_share_the_containers():
    model = get_peft_model(llama(), FrodConfig(target_modules=["q_proj", "v_proj"], progressbar=False))
    tuner = model.base_model
    assert sorted(tuner.frod_V.keys()) == ["self_attn_q_proj", "self_attn_v_proj"]
    layers = tuner.model.model.layers
    assert layers[0].self_attn.q_proj.frod_V is layers[1].self_attn.q_proj.frod_V is tuner.frod_V["self_attn_q_proj"]
    assert layers[0].self_attn.v_proj.frod_V is not layers[0].self_attn.q_proj.frod_V
    # registered once: the tuner's buffers only, no per-layer copy
    names = [name for name, _ in model.named_buffers() if "frod_V" in name]
    assert names == ["base_model.frod_V.self_attn_q_proj.default", "base_model.frod_V.self_attn_v_proj.default"]


def test_only_lambda_and_s_values_train():
    model = get_peft_model(MLP(), FrodConfig(target_modules=["lin0"], progressbar=False))
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.lin0.frod_lambda_l.default", "base_model.model.lin0.frod_lambda_s_values.default"]


def test_conv1d_gpt2_uses_transposed_layout():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        model = get_peft_model(gpt2(), FrodConfig(target_modules=["c_attn"], init_weights=False, progressbar=False))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.is_target_conv_1d_layer and layer.fan_in_fan_out
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = x @ layer.adapted_weight("default", x.device, x.dtype).T + layer.get_base_layer().bias
        prop.assert_close(layer(x), expected)
        assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape


def test_fan_in_fan_out_on_linear_warns_as_peft():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        model = get_peft_model(MLP(), FrodConfig(target_modules=["lin0"], fan_in_fan_out=True, progressbar=False))
    assert model.peft_config["default"].fan_in_fan_out is False


def test_unsupported_layer_is_a_type_error():
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(MLP(), FrodConfig(target_modules=["lin0", "emb"], progressbar=False))
    with pytest.raises(ValueError, match="No layer types compatible with FRoD were found"):
        get_peft_model(MLP(), FrodConfig(target_modules=["emb"], progressbar=False))


def test_dropout_path_matches_the_base_plus_difference():
    model = get_peft_model(MLP(), FrodConfig(target_modules=["lin0"], init_weights=False, frod_dropout=0.5, progressbar=False))
    layer = model.base_model.model.lin0
    layer.train()
    x = torch.randn(4, 10)
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    h = layer.frod_dropout["default"](x)
    weight = layer.get_base_layer().weight
    adapted = layer.adapted_weight("default", x.device, x.dtype)
    expected = layer.get_base_layer()(x) + h @ adapted.T - h @ weight.T
    prop.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------- several adapters
def test_adapters_must_share_key_and_save_projection():
    model = get_peft_model(MLP(), FrodConfig(target_modules=["lin0"], progressbar=False))
    with pytest.raises(ConfigError, match="FRoD projection initialization key must be the same for all adapters"):
        model.add_adapter("other", FrodConfig(target_modules=["lin0"], projection_prng_key=1, progressbar=False))
    with pytest.raises(ConfigError, match="must be saved for all adapters or none"):
        model.add_adapter("other", FrodConfig(target_modules=["lin0"], save_projection=False, progressbar=False))
    with pytest.raises(ConfigError, match="offloading must be enabled for all adapters or none"):
        model.add_adapter("other", FrodConfig(target_modules=["lin0"], runtime_offload_base_weight=True, progressbar=False))
    assert list(model.base_model.frod_V["lin0"].keys()) == ["default"]  # failed adds leave nothing behind


def test_delete_adapter_drops_its_projections():
    model = get_peft_model(MLP(), FrodConfig(target_modules=["lin0"], progressbar=False))
    model.add_adapter("other", FrodConfig(target_modules=["lin0", "lin1"], progressbar=False))
    tuner = model.base_model
    assert sorted(tuner.frod_V.keys()) == ["lin0", "lin1"]
    model.delete_adapter("other")
    assert list(tuner.frod_V.keys()) == ["lin0"] and list(tuner.frod_V["lin0"].keys()) == ["default"]
    assert "other" not in model.base_model.model.lin1.__dict__.get("frod_lambda_l", {})


def test_two_adapters_merged_in_turn_fold_into_the_original_weight():
    inputs = {"x": torch.randn(4, 10)}
    model = get_peft_model(MLP(), FrodConfig(target_modules=["lin0"], init_weights=False, progressbar=False))
    model.add_adapter("other", FrodConfig(target_modules=["lin0"], init_weights=False, progressbar=False))
    original = model.base_model.model.lin0.get_base_layer().weight.detach().clone()
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        both = model(**inputs)
        model.merge_adapter(["default"])
        model.merge_adapter(["other"])
        prop.assert_close(model(**inputs), both)
        model.unmerge_adapter()
    assert torch.equal(model.base_model.model.lin0.get_base_layer().weight, original)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_projections_once(tmp_path):
    model = get_peft_model(llama(), config_for("llama"))
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert "base_model.frod_V.self_attn_q_proj" in keys and "base_model.frod_s_indices.mlp_down_proj" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.frod_lambda_s_values" in keys
    assert not any("frod_U" in key or ".default" in key for key in keys)


def test_save_projection_false_regenerates_the_same_adapter(tmp_path):
    inputs = lm_inputs()
    model = get_peft_model(llama(), config_for("llama", save_projection=False))
    expected = prop.output_of(model, inputs)
    model.save_pretrained(str(tmp_path))
    keys = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert not any("frod_V" in key or "frod_s_" in key for key in keys)
    assert not any("frod_V" in key for key in model.state_dict())
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path))
    prop.assert_close(prop.output_of(loaded, inputs), expected)


def test_missing_projections_with_save_projection_true_raise(tmp_path):
    get_peft_model(llama(), config_for("llama", save_projection=False)).save_pretrained(str(tmp_path))
    config = PeftConfig.from_pretrained(str(tmp_path))
    config.save_projection = True
    with pytest.raises(ValueError, match="Specified to load FRoD projection tensors from state dictionary"):
        PeftModel.from_pretrained(llama(), str(tmp_path), config=config)


def test_present_projections_with_save_projection_false_warn(tmp_path):
    get_peft_model(llama(), config_for("llama")).save_pretrained(str(tmp_path))
    config = PeftConfig.from_pretrained(str(tmp_path))
    config.save_projection = False
    with pytest.warns(UserWarning, match="Specified to not load FRoD projection tensors"):
        PeftModel.from_pretrained(llama(), str(tmp_path), config=config)


# ---------------------------------------------------------------------------------------------- properties
CASES = list(TARGETS)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"target_modules": TARGETS[name][:1]},
))


def test_later_adapter_reuses_the_first_adapters_projections():
    """As peft: a second adapter on an existing category takes the first one's V and pattern (its own sparse_rate aside)."""
    model = get_peft_model(llama(), FrodConfig(target_modules=["q_proj", "v_proj"], progressbar=False))
    model.add_adapter("other", FrodConfig(target_modules=["v_proj"], sparse_rate=0.1, progressbar=False))
    indices = model.base_model.frod_s_indices["self_attn_v_proj"]
    assert torch.equal(indices["other"], indices["default"])
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert layer.frod_lambda_s_values["other"].shape == layer.frod_lambda_s_values["default"].shape == (10,)
