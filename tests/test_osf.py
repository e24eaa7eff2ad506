"""OSF: config checks, the SVD split, the gradient projection, merge-only semantics, and the shared
property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, OSFConfig, PeftConfig, PeftModel, TargetModulesError, get_peft_model
from peftkit.quantization import QuantizationConfig, quantize_model
from peftkit.tuners.osf.layer import Linear as OSFLinear
from peftkit.tuners.osf.model import resolve_effective_rank
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}
#: Random factors of a large trained rank move the logits a lot; merged vs unmerged then differ by float
#: rounding of that size (peft's own suite allows 1e-4 for OSF).
MERGE_ATOL = 1e-4


def config_for(name: str, **overrides) -> OSFConfig:
    """A quarter (T5: a tenth) of each weight's singular directions trained, from random factors (a non-trivial adapter)."""
    kwargs = dict(target_modules=TARGETS[name], effective_rank=0.9 if name == "t5" else 0.75, init_weights=False)
    kwargs["task_type"] = MODEL_FACTORIES[name].task_type
    kwargs.update(overrides)
    return OSFConfig(**kwargs)


class MLP(nn.Module):
    """lin0 is tall (out > in: U not square), lin1 wide (out < in: V not square), lin2 square."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(6, 10)
        self.lin1 = nn.Linear(10, 4)
        self.lin2 = nn.Linear(4, 4)
        self.emb = nn.Embedding(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def wrapped(**overrides):
    kwargs = {"target_modules": ["lin0", "lin1", "lin2"], **overrides}
    return get_peft_model(MLP(), OSFConfig(**kwargs))


def inputs_mlp() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(OSFConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.OSFConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"effective_rank": "8"}, r"effective_rank='8' is invalid"),
        ({"effective_rank": True}, r"effective_rank=True is invalid"),
        ({"effective_rank": float("nan")}, r"effective_rank=nan is invalid"),
        ({"rank_pattern": {"lin0": "half"}}, r"rank_pattern\['lin0'\]='half' is invalid"),
        ({"rank_pattern": ["lin0"]}, r"rank_pattern=\['lin0'\] is invalid"),
        ({"init_weights": "yes"}, r"init_weights='yes' is invalid"),
        ({"target_svd_config": 3}, r"target_svd_config=3 is invalid"),
        ({"target_modules": [1]}, "Module names must be strings"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OSFConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_target_list_stays_a_list_and_json_roundtrips(tmp_path):
    config = OSFConfig(target_modules=["q_proj", "v_proj"], effective_rank=0.5, rank_pattern={"v_proj": 3})
    assert config.target_modules == ["q_proj", "v_proj"]  # peft does not turn OSF's list into a set
    config.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is OSFConfig
    assert (loaded.effective_rank, loaded.rank_pattern, loaded.peft_type) == (0.5, {"v_proj": 3}, "OSF")


# ---------------------------------------------------------------------------------------------- targets and ranks
def test_no_targets_on_a_custom_model_means_every_linear_layer():
    model = get_peft_model(MLP(), OSFConfig())
    assert model.targeted_module_names == ["lin0", "lin1", "lin2"]
    assert model.peft_config["default"].target_modules == {"lin0", "lin1", "lin2"}


def test_no_targets_on_llama_uses_peft_projection_table():
    model = get_peft_model(llama(), OSFConfig())
    wrapped_names = {name.rpartition(".")[2] for name, _ in model.base_model.tuner_layers()}
    assert wrapped_names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_non_linear_targets_are_passed_over_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = get_peft_model(MLP(), OSFConfig(target_modules=["lin0", "emb"]))
    assert type(model.base_model.model.emb) is nn.Embedding and isinstance(model.base_model.model.lin0, OSFLinear)
    assert "emb" in model.targeted_module_names  # as peft: it matched, nothing was wrapped
    model = get_peft_model(gpt2(), OSFConfig(target_modules=["c_attn"]))
    assert not list(model.base_model.tuner_layers())


def test_quantized_base_is_refused():
    with pytest.raises(TargetModulesError, match="OSF cannot wrap"):
        get_peft_model(quantize_model(llama(), QuantizationConfig(load_in_8bit=True)), OSFConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize(
    "value, min_dim, expected",
    [(None, 10, 5), (None, 1, 0), (0.5, 10, 5), (0.25, 10, 2), (1.0, 10, 10), (1, 10, 1), (3, 10, 3), (30, 10, 10),
     (1.5, 10, 1), (-2, 10, 0)],
)
def test_effective_rank_resolution_follows_peft(value, min_dim, expected):
    assert resolve_effective_rank(value, min_dim) == expected


def test_ranks_per_layer_and_rank_pattern():
    model = wrapped(effective_rank=0.5, rank_pattern={"lin1": 1, "lin": 3})
    layers = {name: layer for name, layer in model.base_model.tuner_layers()}
    assert {name: layer.effective_rank["default"] for name, layer in layers.items()} == {"lin0": 3, "lin1": 1, "lin2": 3}
    params = layers["lin1"].osf_svd_params["default"]
    assert (params["U_low"].shape, params["S_low"].shape, params["V_low"].shape) == ((4, 3), (3,), (3, 10))


def test_effective_rank_zero_is_refused_and_nothing_changes():
    model = MLP()
    with pytest.raises(ConfigError, match="`effective_rank` should be a positive integer value but the value passed is 0"):
        get_peft_model(model, OSFConfig(target_modules=["lin0", "lin1"], rank_pattern={"lin1": 0}))
    assert type(model.lin0) is nn.Linear and type(model.lin1) is nn.Linear


# ---------------------------------------------------------------------------------------------- the maths
def test_svd_split_and_which_high_part_is_kept():
    layers = dict(wrapped(effective_rank=2).base_model.tuner_layers())
    for name, layer in layers.items():
        weight = layer.base_layer.weight.detach()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u0, s0, v0 = layer.initial_factors("default")
        prop.assert_close(u0 * s0 @ v0, u[:, 2:] * s[2:] @ vh[2:])
        prop.assert_close(u[:, :2] * s[:2] @ vh[:2] + u0 * s0 @ v0, weight)
        params = layer.osf_svd_params["default"]
        assert torch.equal(params["S_low"].detach(), s0)  # init_weights=True starts at the SVD's own low part
    assert list(layers["lin0"]._osf_U_high.keys()) == ["default"] and not layers["lin0"]._osf_V_high
    assert list(layers["lin1"]._osf_V_high.keys()) == ["default"] and not layers["lin1"]._osf_U_high
    assert not layers["lin2"]._osf_U_high and not layers["lin2"]._osf_V_high


def test_forward_and_delta_weight_by_hand():
    layer = wrapped(init_weights=False).base_model.model.lin0
    params = {k: v.detach() for k, v in layer.osf_svd_params["default"].items()}
    u0, s0, v0 = layer.initial_factors("default")
    delta = params["U_low"] * params["S_low"] @ params["V_low"] - u0 * s0 @ v0
    x = inputs_mlp()
    with torch.no_grad():
        prop.assert_close(layer.get_delta_weight("default"), delta)
        prop.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, atol=1e-4)


def test_fresh_adapter_is_identity_up_to_svd_rounding():
    model = wrapped()
    x = inputs_mlp()
    with torch.no_grad():
        prop.assert_close(model(x), MLP()(x), atol=1e-5)


def assert_negligible(value: torch.Tensor, scale: torch.Tensor) -> None:
    """`value` is zero up to float32 rounding relative to the size of `scale` (a gradient)."""
    assert float(value.abs().max()) < 1e-5 * float(scale.abs().max()) + 1e-7, float(value.abs().max())


def _gradients(model) -> dict:
    x = inputs_mlp()
    model(x).pow(2).sum().backward()
    return {name: layer for name, layer in model.base_model.tuner_layers()}


def test_gradients_are_orthogonal_to_the_frozen_high_subspace():
    layers = _gradients(wrapped(effective_rank=2, init_weights=False))
    for name, layer in layers.items():
        u, _, vh = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
        params = layer.osf_svd_params["default"]
        grad_u, grad_v = params["U_low"].grad, params["V_low"].grad
        assert grad_u.abs().max() > 1e-3 and grad_v.abs().max() > 1e-3, name
        assert_negligible(u[:, :2].T @ grad_u, grad_u)
        assert_negligible(grad_v @ vh[:2].T, grad_v)
        assert params["S_low"].grad is not None


def test_projection_matches_an_unprojected_gradient_by_hand():
    model = wrapped(effective_rank=2, init_weights=False)
    free = wrapped(effective_rank=2, init_weights=False)
    for (_, layer), (_, other) in zip(model.base_model.tuner_layers(), free.base_model.tuner_layers()):
        for key in ("U_low", "S_low", "V_low"):
            with torch.no_grad():
                other.osf_svd_params["default"][key].copy_(layer.osf_svd_params["default"][key])
        other.trained_factors = lambda name, o=other: tuple(o.osf_svd_params[name][k] for k in ("U_low", "S_low", "V_low"))
    projected, raw = _gradients(model), _gradients(free)
    for name, layer in projected.items():
        u, _, vh = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
        raw_u, raw_v = raw[name].osf_svd_params["default"]["U_low"].grad, raw[name].osf_svd_params["default"]["V_low"].grad
        expected_u = raw_u - u[:, :2] @ (u[:, :2].T @ raw_u)
        expected_v = raw_v - (raw_v @ vh[:2].T) @ vh[:2]
        params = layer.osf_svd_params["default"]
        assert_negligible(params["U_low"].grad - expected_u, raw_u)
        assert_negligible(params["V_low"].grad - expected_v, raw_v)
        assert (raw_u - expected_u).abs().max() > 1e-3 * raw_u.abs().max(), "the projection removed nothing"


def test_projection_survives_replaced_parameters():
    model = wrapped(effective_rank=2, init_weights=False)
    layer = model.base_model.model.lin0
    fresh = nn.Parameter(layer.osf_svd_params["default"]["U_low"].detach().double().float())
    layer.osf_svd_params["default"]["U_low"] = fresh  # what dtype casts or a meta-device load do
    _gradients(model)
    u = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)[0]
    assert_negligible(u[:, :2].T @ fresh.grad, fresh.grad)


def test_only_first_active_adapter_runs():
    model = wrapped(init_weights=False)
    model.add_adapter("other", OSFConfig(target_modules=["lin0", "lin1", "lin2"], init_weights=False))
    x = inputs_mlp()
    with torch.no_grad():
        first = model(x)
        model.base_model.set_adapter(["default", "other"])
        prop.assert_close(model(x), first, atol=0)
        model.base_model.set_adapter(["other", "default"])
        assert not torch.allclose(model(x), first)


def test_saved_tensors_are_the_trained_factors_only(tmp_path):
    model = wrapped(init_weights=False)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    factors = ("S_low", "U_low", "V_low")
    assert trainable == [f"base_model.model.{m}.osf_svd_params.default.{f}" for m in ("lin0", "lin1", "lin2") for f in factors]
    assert not any("_osf_" in key for key in model.state_dict())  # the frozen parts are rebuilt, never saved
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == [f"base_model.model.{m}.osf_svd_params.{f}" for m in ("lin0", "lin1", "lin2") for f in factors]


def test_low_cpu_mem_usage_load_keeps_the_projection(tmp_path):
    wrapped(init_weights=False, effective_rank=2).save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path), low_cpu_mem_usage=True, is_trainable=True)
    expected = wrapped(init_weights=False, effective_rank=2)
    x = inputs_mlp()
    with torch.no_grad():
        prop.assert_close(loaded(x), PeftModel.from_pretrained(MLP(), str(tmp_path))(x), atol=0)
    layers = _gradients(loaded)
    u = torch.linalg.svd(layers["lin0"].base_layer.weight.detach(), full_matrices=False)[0]
    grad = layers["lin0"].osf_svd_params["default"]["U_low"].grad
    assert_negligible(u[:, :2].T @ grad, grad)
    assert expected.get_nb_trainable_parameters() == loaded.get_nb_trainable_parameters()


# ---------------------------------------------------------------------------------------------- merging
def test_merge_only_unmerge_is_refused_as_in_peft():
    model = wrapped(init_weights=False)
    x = inputs_mlp()
    with torch.no_grad():
        adapted = model(x)
        with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
            model.base_model.model.lin0.unmerge()
        model.merge_adapter()
        prop.assert_close(model(x), adapted, atol=MERGE_ATOL)
        with pytest.raises(NotImplementedError, match="^OSF models do not support unmerging$"):
            model.unmerge_adapter()
        with pytest.warns(UserWarning, match="OSF does not support unmerging. Original weights are permanently modified."):
            model.base_model.model.lin0.unmerge()
        assert model.base_model.model.lin0.merged
        with model.disable_adapter():  # the merged weights stay: disabled is not the base model (peft's behaviour)
            prop.assert_close(model(x), adapted, atol=MERGE_ATOL)
        unloaded = model.unload()
        prop.assert_close(unloaded(x), adapted, atol=MERGE_ATOL)


def test_safe_merge_refuses_nan():
    model = wrapped(init_weights=False)
    with torch.no_grad():
        model.base_model.model.lin1.osf_svd_params["default"]["S_low"][0] = float("nan")
    weight = model.base_model.model.lin1.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin1.base_layer.weight, weight)


def test_delete_adapter_leaves_no_per_adapter_state():
    model = wrapped()
    model.add_adapter("other", OSFConfig(target_modules=["lin0"], effective_rank=1))
    model.delete_adapter("other")
    layer = model.base_model.model.lin0
    for attr in layer.adapter_layer_names + layer.other_param_names:
        assert "other" not in getattr(layer, attr), attr


@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base(autocast):
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"), autocast_adapter_dtype=autocast)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = torch.float32 if autocast else torch.bfloat16
    assert layer.osf_svd_params["default"]["U_low"].dtype == expected
    assert layer.initial_factors("default")[0].dtype == expected
    with torch.no_grad():
        out = model(**lm_inputs()).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        model.merge_adapter()
        assert layer.base_layer.weight.dtype == torch.bfloat16
        merged = model(**lm_inputs()).logits.float()
        assert (merged - out.float()).abs().max() < 0.1 * out.float().abs().max()


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


def test_fresh_adapter_is_noop(case):
    name, tiny = case
    base_out = prop.output_of(tiny.make_model(), tiny.make_inputs())
    adapted = prop.output_of(get_peft_model(tiny.make_model(), config_for(name, init_weights=True)), tiny.make_inputs())
    prop.assert_close(adapted, base_out, atol=1e-4)


def test_merge_equals_unmerged(case):
    name, tiny = case
    inputs = tiny.make_inputs()
    model = get_peft_model(tiny.make_model(), config_for(name))
    unmerged = prop.output_of(model, inputs)
    prop.assert_differs(unmerged, prop.output_of(tiny.make_model(), inputs))
    model.merge_adapter()
    prop.assert_close(prop.output_of(model, inputs), unmerged, atol=MERGE_ATOL)
    merged = get_peft_model(tiny.make_model(), config_for(name)).merge_and_unload()
    assert not isinstance(merged, PeftModel)
    prop.assert_close(prop.output_of(merged, inputs), unmerged, atol=MERGE_ATOL)


# the fresh adapter (atol 1e-4) and merging (MERGE_ATOL) are checked by hand above, with looser tolerances
globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"effective_rank": 0.5},
    only_adapter=({"init_weights": True},),
    lr=1e-2,
    mergeable=False,
    leave_out=("test_fresh_adapter_is_noop",),
))
