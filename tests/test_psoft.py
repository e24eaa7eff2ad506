"""PSOFT: config checks, the principal-subspace factors, R's parameterisations, merging, and the
shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from peftkit import ConfigError, PeftConfig, PsoftConfig, TargetModulesError, get_peft_model
from peftkit.quantization import QuantizationConfig, quantize_model
from peftkit.tuners.psoft.layer import Linear as PsoftLinear
from peftkit.tuners.psoft.orthogonal import PsoftRotation, neumann_cayley
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> PsoftConfig:
    """Rank 4, a perturbed R (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(r=4, psoft_alpha=8, target_modules=TARGETS[name], init_weights=False)
    kwargs["task_type"] = MODEL_FACTORIES[name].task_type
    kwargs.update(overrides)
    return PsoftConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 8)
        self.lin1 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def lin0_layer(**overrides) -> PsoftLinear:
    kwargs = {"target_modules": ["lin0"], "r": 3, "psoft_alpha": 6, **overrides}
    return get_peft_model(MLP(), PsoftConfig(**kwargs)).base_model.model.lin0


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(PsoftConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.PsoftConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, r"`r` must be a positive integer; got 0"),
        ({"r": 2.5}, r"`r` must be a positive integer; got 2.5"),
        ({"ab_svd_init": "lora"}, r"`ab_svd_init` must be one of \['pissa_init', 'psoft_init'\]; got 'lora'"),
        ({"psoft_svd": "qr"}, r"`psoft_svd` must be one of \['full', 'lowrank'\]; got 'qr'"),
        ({"use_cayley_neumann": True, "num_cayley_neumann_terms": 0}, "`num_cayley_neumann_terms` must be a positive"),
        ({"use_cayley_neumann": True, "cayley_neumann_eps": 1.5}, r"`cayley_neumann_eps` must be in \(0, 1\)"),
        ({"target_modules": "q.*", "layers_to_transform": [0]}, "`layers_to_transform` cannot be used"),
        ({"target_modules": "q.*", "layers_pattern": "layers"}, "`layers_pattern` cannot be used"),
        ({"layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
        ({"psoft_dropout": 1.0}, r"psoft_dropout=1.0 .*\[0, 1\)"),
        ({"psoft_alpha": float("nan")}, "psoft_alpha=nan is invalid"),
        ({"psoft_orth": "yes"}, "psoft_orth='yes' is invalid"),
        ({"random_seed": None}, "random_seed=None is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PsoftConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"psoft_svd_lowrank_niter": 3}, "`psoft_svd_lowrank_niter` is only used when `psoft_svd='lowrank'`"),
        ({"num_cayley_neumann_terms": 3}, "`num_cayley_neumann_terms` is only used when `use_cayley_neumann=True`"),
        ({"cayley_neumann_eps": 0.5}, "`cayley_neumann_eps` is only used when `use_cayley_neumann=True`"),
    ],
)
def test_ignored_fields_warn_as_in_peft(kwargs, message):
    with pytest.warns(UserWarning, match=message):
        PsoftConfig(**kwargs)


def test_json_roundtrip_dispatches_to_psoft(tmp_path):
    config = PsoftConfig(r=6, psoft_svd="lowrank", random_seed=3, psoft_mag_a=False, target_modules=["q_proj"])
    config.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is PsoftConfig
    assert (loaded.r, loaded.psoft_svd, loaded.random_seed, loaded.psoft_mag_a) == (6, "lowrank", 3, False)


def test_rank_above_layer_size_is_refused_and_nothing_changes():
    model = MLP()
    with pytest.raises(ConfigError, match=r"`r` \(9\) must be less than or equal to min\(in_features, out_features\)"):
        get_peft_model(model, PsoftConfig(target_modules=["lin0"], r=9))
    assert type(model.lin0) is nn.Linear


def test_unsupported_layers_are_refused():
    with pytest.raises(TargetModulesError, match="PSOFT cannot wrap"):
        get_peft_model(gpt2(), PsoftConfig(target_modules=["c_attn"], r=4))
    with pytest.raises(TargetModulesError, match="PSOFT cannot wrap"):
        get_peft_model(quantize_model(llama(), QuantizationConfig(load_in_4bit=True)),
                       PsoftConfig(target_modules=["q_proj"], r=4))


def test_fan_in_fan_out_is_corrected_with_peft_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out=True is not compatible with `torch.nn.Linear`"):
        model = get_peft_model(MLP(), PsoftConfig(target_modules=["lin0"], r=2, fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is False


# ---------------------------------------------------------------------------------------------- the maths
def test_psoft_init_factors_span_the_top_singular_subspace():
    layer = lin0_layer()
    weight = layer.base_layer.weight.detach()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    factor_a, factor_b = layer.basis("default")
    prop.assert_close(factor_a @ factor_a.T, torch.eye(3))  # orthonormal rows
    # scaling * B A is the best rank-3 approximation of W
    prop.assert_close(layer.scaling["default"] * factor_b @ factor_a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    assert layer.scaling["default"] == 2.0


def test_pissa_init_splits_the_singular_values_evenly():
    layer = lin0_layer(ab_svd_init="pissa_init")
    factor_a, factor_b = layer.basis("default")
    prop.assert_close(factor_a.norm(dim=1), factor_b.norm(dim=0))
    u, s, vh = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
    prop.assert_close(layer.scaling["default"] * factor_b @ factor_a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])


def test_lowrank_svd_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    first = lin0_layer(psoft_svd="lowrank", random_seed=7).basis("default")[0]
    after = torch.rand(3)
    torch.manual_seed(11)
    MLP()
    assert torch.equal(after, torch.rand(3))  # only MLP() consumed the global RNG
    torch.manual_seed(99)
    assert torch.equal(lin0_layer(psoft_svd="lowrank", random_seed=7).basis("default")[0], first)
    other_seed = lin0_layer(psoft_svd="lowrank", random_seed=8, psoft_svd_lowrank_niter=0).basis("default")[0]
    assert not torch.equal(other_seed, first)


def test_cayley_is_orthogonal_and_scaled_by_the_vectors():
    rotation = PsoftRotation(4)
    rotation.reset_parameters(init_weights=False)
    with torch.no_grad():
        rotation.vector_a.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        rotation.vector_b.copy_(torch.tensor([0.5, 1.0, 3.0, 1.0]))
    matrix = rotation.get_matrix().detach()
    q_matrix = rotation.skew().detach()
    prop.assert_close(q_matrix, -q_matrix.T, atol=0)
    eye = torch.eye(4)
    core = (eye + q_matrix) @ torch.linalg.inv(eye - q_matrix)
    prop.assert_close(core @ core.T, eye)
    prop.assert_close(matrix, torch.diag(rotation.vector_b.detach()) @ core @ torch.diag(rotation.vector_a.detach()))


def test_neumann_series_follows_peft_terms():
    q_matrix = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    q_matrix = q_matrix - q_matrix.T
    eye, q2 = torch.eye(4), q_matrix @ q_matrix
    q3, q4 = q2 @ q_matrix, q2 @ q2
    prop.assert_close(neumann_cayley(q_matrix, 1), eye)
    prop.assert_close(neumann_cayley(q_matrix, 2), eye + 2 * q_matrix)
    prop.assert_close(neumann_cayley(q_matrix, 3), eye + 2 * q_matrix + 2 * q2 + q3)
    prop.assert_close(neumann_cayley(q_matrix, 4), eye + 2 * q_matrix + 2 * q2 + q3)
    prop.assert_close(neumann_cayley(q_matrix, 5), eye + 2 * q_matrix + 2 * q2 + 2 * q3 + q4)


def test_cayley_neumann_eps_bounds_q():
    rotation = PsoftRotation(5, use_cayley_neumann=True, num_cayley_neumann_terms=2, cayley_neumann_eps=0.1,
                             mag_a=False, mag_b=False)
    with torch.no_grad():
        rotation.weight.fill_(1.0)
    q_matrix = rotation.skew().detach()
    expected = torch.eye(5) + 2 * q_matrix * (0.1 / (q_matrix.norm() + 1e-12))
    prop.assert_close(rotation.get_matrix().detach(), expected)


def test_free_r_without_orthogonality():
    layer = lin0_layer(psoft_orth=False, psoft_mag_a=False, psoft_mag_b=False, init_weights=False)
    rotation = layer.psoft_R["default"]
    assert rotation.weight.shape == (3, 3) and rotation.vector_a is None and rotation.vector_b is None
    assert not torch.allclose(rotation.weight, torch.eye(3))
    prop.assert_close(rotation.get_matrix(), rotation.weight)


def test_forward_and_delta_weight_by_hand():
    layer = lin0_layer(init_weights=False)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    factor_a, factor_b = layer.basis("default")
    rotation = layer.psoft_R["default"].get_matrix().detach()
    delta = layer.scaling["default"] * factor_b @ (rotation - torch.eye(3)) @ factor_a
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)
        prop.assert_close(layer.get_delta_weight("default"), delta)


def test_factors_are_frozen_and_unsaved(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(MLP(), PsoftConfig(target_modules=["lin0", "lin1"], r=2, psoft_mag_a=False))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"base_model.model.{m}.psoft_R.default.{p}" for m in ("lin0", "lin1") for p in ("vector_b", "weight")]
    assert not any("cache" in key for key in model.state_dict())
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == [f"base_model.model.{m}.psoft_R.{p}" for m in ("lin0", "lin1") for p in ("vector_b", "weight")]


def test_delete_adapter_leaves_no_per_adapter_state():
    model = get_peft_model(MLP(), PsoftConfig(target_modules=["lin0"], r=2))
    model.add_adapter("other", PsoftConfig(target_modules=["lin0"], r=3))
    model.delete_adapter("other")
    layer = model.base_model.model.lin0
    for attr in layer.adapter_layer_names + layer.other_param_names:
        assert "other" not in getattr(layer, attr), attr


def test_half_precision_base_keeps_fp32_adapter_and_merges():
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.psoft_R["default"].weight.dtype == torch.float32
    assert layer.basis("default")[0].dtype == torch.float32
    inputs = lm_inputs()
    with torch.no_grad():
        out = model(**inputs).logits
        assert out.dtype == torch.bfloat16
        model.merge_adapter()
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert (model(**inputs).logits.float() - out.float()).abs().max() < 0.1 * out.float().abs().max()


def test_dropout_only_in_training():
    model = get_peft_model(MLP(), PsoftConfig(target_modules=["lin0"], r=3, psoft_dropout=0.5, init_weights=False))
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        prop.assert_close(model(x), model(x), atol=0)
        evaluated = model(x)
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(model(x), evaluated)


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 2, "psoft_orth": False},
))


@pytest.mark.parametrize(
    "overrides",
    [
        {"ab_svd_init": "pissa_init"},
        {"psoft_svd": "lowrank", "random_seed": 3, "psoft_svd_lowrank_niter": 2},
        {"use_cayley_neumann": True, "num_cayley_neumann_terms": 4, "cayley_neumann_eps": 0.5},
        {"psoft_orth": False, "psoft_mag_a": False},
        {"layers_to_transform": [1], "layers_pattern": "layers"},
    ],
    ids=["pissa", "lowrank", "neumann", "free", "layers"],
)
def test_llama_variants(overrides, tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_for("llama", **overrides)
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config)
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config, tmp_path)
