"""GLoRA: config checks, the weight and bias update by hand for every path kind, merging against
(W0, b0), mixed-adapter batches, the bias option, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftkit import ConfigError, GloraConfig, PeftConfig, PeftModel, get_peft_model
from peftkit.tuners.glora.layer import Linear as GloraLinear
from peftkit.tuners.glora.layer import LowRankPath, ScalarPath, VectorPath, ZeroPath
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, llama

# GPT-2's Conv1D is not a plain nn.Linear: GLoRA (as peft) cannot wrap it.
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}
PATHS = [("lora", "lora", "constant"), ("vector", "vector", "vector"), ("constant", "lora", "constant"),
         ("none", "none", "none"), ("lora", "none", "vector")]


def config_for(name: str, **overrides) -> GloraConfig:
    """Rank 2, random paths (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(r=2, target_modules=TARGETS[name], init_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return GloraConfig(**kwargs)


class MLP(nn.Module):
    """lin0 has a bias (all five paths), lin1 has none (A and B only)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(6, 5)
        self.lin1 = nn.Linear(5, 3, bias=False)
        self.emb = nn.Embedding(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def mlp_model(**overrides) -> PeftModel:
    kwargs = dict(r=3, target_modules=["lin0", "lin1"], init_weights=False)
    kwargs.update(overrides)
    torch.manual_seed(1)
    return get_peft_model(MLP(), GloraConfig(**kwargs))


def by_hand(layer: GloraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
    """y = (W0 + W0 * A + B) x + b0 + b0 * D + E + W0 @ C, from the paths' tensors."""
    w0, b0 = layer.base_layer.weight.to(x.dtype), layer.base_layer.bias
    b0 = None if b0 is None else b0.to(x.dtype)
    a, b = layer.glora_A[name](), layer.glora_B[name]()
    y = x @ (w0 + w0 * a + b).T
    if b0 is not None:
        c, d, e = layer.glora_C[name](), layer.glora_D[name](), layer.glora_E[name]()
        y = y + b0 + b0 * d + e + (w0 @ c)[:, 0]
    return y


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(GloraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.GloraConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    config = GloraConfig()
    assert (config.r, config.config_A_B, config.config_C, config.config_D_E) == (8, "lora", "lora", "constant")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"config_A_B": "dense"}, r"Invalid config_A_B value: 'dense'\. Valid values are: constant, lora, none, vector"),
        ({"config_C": "constant"}, r"Invalid config_C value: 'constant'\. Valid values are: lora, none, vector"),
        ({"config_D_E": "lora"}, r"Invalid config_D_E value: 'lora'\. Valid values are: constant, none, vector"),
        ({"r": 0}, "r=0 is invalid"),
        ({"bias": "lora_only"}, "bias='lora_only' is invalid"),
        ({"init_weights": "yes"}, "init_weights='yes' is invalid"),
        ({"target_modules": [1]}, "strings"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GloraConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_json_roundtrip_dispatches_to_glora(tmp_path):
    GloraConfig(r=3, config_A_B="vector", config_D_E="none", bias="glora_only", target_modules=["q_proj"]).save_pretrained(
        str(tmp_path)
    )
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is GloraConfig
    assert (loaded.r, loaded.config_A_B, loaded.config_D_E, loaded.bias, loaded.target_modules) == (
        3, "vector", "none", "glora_only", {"q_proj"})


def test_default_targets_are_query_value():
    model = get_peft_model(llama(), GloraConfig(r=2))
    assert sorted({key.rpartition(".")[2] for key, _ in model.base_model.tuner_layers()}) == ["q_proj", "v_proj"]


def test_only_plain_linear_is_wrapped_and_nothing_changes_on_refusal():
    model = MLP()
    with pytest.raises(ValueError, match="GLoRA cannot wrap"):
        get_peft_model(model, GloraConfig(target_modules=["lin0", "emb"]))
    assert type(model.lin0) is nn.Linear and type(model.emb) is nn.Embedding


# ---------------------------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("a_b, c, d_e", PATHS)
def test_update_by_hand_for_every_path_kind(a_b, c, d_e):
    model = mlp_model(config_A_B=a_b, config_C=c, config_D_E=d_e)
    x = torch.randn(4, 6)
    with torch.no_grad():
        for layer, inputs in ((model.base_model.model.lin0, x), (model.base_model.model.lin1, torch.randn(4, 5))):
            assert type(layer) is GloraLinear
            prop.assert_close(layer(inputs), by_hand(layer, "default", inputs))
            if a_b != "none" or (layer.base_layer.bias is not None and (c, d_e) != ("none", "none")):
                prop.assert_differs(layer(inputs), layer.base_layer(inputs))


def test_path_shapes_and_bias_free_base():
    model = mlp_model(config_C="vector", config_D_E="vector")
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert isinstance(lin0.glora_A["default"], LowRankPath)
    assert lin0.glora_A["default"].Xd.shape == (5, 3) and lin0.glora_A["default"].Xu.shape == (3, 6)
    assert isinstance(lin0.glora_C["default"], VectorPath) and lin0.glora_C["default"].X.shape == (6, 1)
    assert lin0.glora_D["default"].X.shape == (5,)
    # no base bias: C, D, E are zero buffers and hold no parameters
    for attr, shape in (("glora_C", (5, 1)), ("glora_D", (3,)), ("glora_E", (3,))):
        path = getattr(lin1, attr)["default"]
        assert isinstance(path, ZeroPath) and path.zeros.shape == shape and not list(path.parameters())
    constant = mlp_model(config_A_B="constant").base_model.model.lin0.glora_A["default"]
    assert isinstance(constant, ScalarPath) and constant().dim() == 0


@pytest.mark.parametrize("a_b, c, d_e", PATHS)
def test_default_init_is_noop_and_trainable_count(a_b, c, d_e):
    model = mlp_model(config_A_B=a_b, config_C=c, config_D_E=d_e, init_weights=True)
    x = torch.randn(4, 6)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        prop.assert_close(model(x), base)
    per_a_b = {"lora": 3 * (5 + 6) + 3 * (3 + 5), "vector": 5 + 3, "constant": 2, "none": 0}[a_b]
    per_c = {"lora": 6 * 3 + 3, "vector": 6, "none": 0}[c]
    per_d_e = {"vector": 5, "constant": 1, "none": 0}[d_e]
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * per_a_b + per_c + 2 * per_d_e


def test_random_init_draws_every_path():
    lin0 = mlp_model(config_D_E="vector").base_model.model.lin0
    for attr in lin0.adapter_layer_names:
        for param in lin0.__getattr__(attr)["default"].parameters():
            assert bool((param != 0).any()), attr
    assert bool((mlp_model(init_weights=True).base_model.model.lin0.glora_A["default"].Xd == 0).all())


def test_two_active_adapters_add_their_updates():
    model = mlp_model()
    model.add_adapter("other", GloraConfig(r=2, target_modules=["lin0"], config_A_B="vector", init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.lin0
    x = torch.randn(3, 6)
    base = layer.base_layer(x)
    with torch.no_grad():
        expected = by_hand(layer, "default", x) + by_hand(layer, "other", x) - base
        prop.assert_close(layer(x), expected)


def test_fused_forward_equals_separate_forward():
    """A hook on the base disables the one-matmul path; both paths give the same output."""
    layer = mlp_model().base_model.model.lin0
    x = torch.randn(3, 6)
    with torch.no_grad():
        fused = layer(x)
        handle = layer.base_layer.register_forward_hook(lambda *_: None)
        separate = layer(x)
        handle.remove()
    prop.assert_close(fused, separate)
    prop.assert_differs(fused, layer.base_layer(x))


def test_bf16_base_keeps_fp32_adapter_and_output_dtype():
    torch.manual_seed(1)
    model = get_peft_model(MLP().to(torch.bfloat16), GloraConfig(target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    assert layer.glora_A["default"].Xd.dtype == torch.float32
    x = torch.randn(2, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        reference = by_hand(layer, "default", x.float())
    assert out.dtype == torch.bfloat16
    prop.assert_close(out.float(), reference.to(torch.bfloat16).float(), atol=5e-2)


# ---------------------------------------------------------------------------------------------- merging
def test_adapters_merged_in_turn_fold_into_w0_and_unmerge_exactly():
    model = mlp_model()
    model.add_adapter("other", GloraConfig(r=2, target_modules=["lin0"], config_D_E="vector", init_weights=False))
    layer = model.base_model.model.lin0
    w0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        dw1, db1 = layer.delta("default", w0, b0)
        dw2, db2 = layer.delta("other", w0, b0)
    model.merge_adapter(["default"])
    model.merge_adapter(["other"])
    prop.assert_close(layer.base_layer.weight, w0 + dw1 + dw2)
    prop.assert_close(layer.base_layer.bias, b0 + db1 + db2)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)
    assert layer._base_before_merge is None


def test_merged_output_equals_two_active_adapters():
    model = mlp_model()
    model.add_adapter("other", GloraConfig(r=2, target_modules=["lin0", "lin1"], config_A_B="constant", init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 6)
    with torch.no_grad():
        both = model(x)
        model.merge_adapter()
        prop.assert_close(model(x), both)
        merged = model.merge_and_unload()
        prop.assert_close(merged(x), both)
    assert type(merged.lin0) is nn.Linear


def test_safe_merge_refuses_inf_and_keeps_weights():
    model = mlp_model(init_weights=True)
    layer = model.base_model.model.lin0
    w0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        next(layer.glora_B["default"].parameters()).fill_(float("inf"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)
    assert layer.merged_adapters == []


def test_disabling_a_merged_layer_unmerges_it():
    model = mlp_model()
    x = torch.randn(2, 6)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        model.merge_adapter()
        with model.disable_adapter():
            prop.assert_close(model(x), base)
    assert not model.base_model.model.lin0.merged


# ---------------------------------------------------------------------------------------------- mixed batches
def two_adapter_mlp() -> PeftModel:
    model = mlp_model()
    model.add_adapter("other", GloraConfig(r=2, target_modules=["lin0"], config_A_B="vector", init_weights=False))
    return model.eval()


def test_mixed_batch_matches_each_adapter_alone():
    model = two_adapter_mlp()
    x = torch.randn(6, 6)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        first = model(x)
        model.set_adapter("other")
        other = model(x)
        mixed = model(x, adapter_names=["__base__", "default", "other"] * 2)
    prop.assert_differs(first, other)
    prop.assert_close(mixed[0::3], base[0::3])
    prop.assert_close(mixed[1::3], first[1::3])
    prop.assert_close(mixed[2::3], other[2::3])


@pytest.mark.parametrize(
    "prepare, names, message",
    [
        (lambda m: m.train(), ["default"] * 6, "Cannot pass `adapter_names` when the model is in training mode"),
        (lambda m: m.merge_adapter(["default"]), ["default"] * 6, "there are merged adapters"),
        (lambda m: None, ["default", "nope"] * 3, r"Trying to infer with non-existing adapter\(s\): nope"),
        (lambda m: None, ["default"] * 4, "Length of `adapter_names` should be the same"),
    ],
)
def test_mixed_batch_errors(prepare, names, message):
    model = two_adapter_mlp()
    prepare(model)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(6, 6), adapter_names=names)


# ---------------------------------------------------------------------------------------------- bias option
@pytest.mark.parametrize("bias, trained", [("none", set()), ("glora_only", {"lin0.bias"}), ("all", {"lin0.bias"})])
def test_bias_option_trains_and_saves_biases(bias, trained, tmp_path):
    model = mlp_model(bias=bias, target_modules=["lin0"])
    names = {n.removeprefix("base_model.model.").replace(".base_layer", "") for n, p in model.named_parameters()
             if p.requires_grad and "glora_" not in n}
    assert names == trained
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k for k in saved if k.endswith(".bias")} == ({"base_model.model.lin0.base_layer.bias"} if trained else set())  # as peft


def test_only_one_adapter_with_bias():
    model = mlp_model(bias="glora_only")
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", GloraConfig(target_modules=["lin0"], bias="all"))


def test_save_load_keeps_zero_buffers_as_peft(tmp_path):
    model = mlp_model(config_A_B="none")
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.lin0.glora_A.zeros" in keys and "base_model.model.lin1.glora_C.zeros" in keys
    assert "base_model.model.lin0.glora_C.Xd" in keys
    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path))
    x = torch.randn(2, 6)
    with torch.no_grad():
        prop.assert_close(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------- properties
CASES = list(TARGETS)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 3, "target_modules": TARGETS[name][:1], "config_A_B": "vector"},
))


