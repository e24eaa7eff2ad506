"""GraLoRA: config checks, the block update by hand (k x k grid, hybrid LoRA, Conv1D layout), merging,
bias options, quantized bases, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from peftkit import (
    ConfigError,
    GraloraConfig,
    PeftConfig,
    TargetModulesError,
    get_peft_model,
    get_peft_model_state_dict,
)
from peftkit.quantization import Linear4bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.gralora.layer import Linear as GraloraLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value", "dense"],
    "t5": ["q", "v", "wo"],
}


def config_for(name: str, **overrides) -> GraloraConfig:
    """Rank 4 over a 2 x 2 grid, random B (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(r=4, alpha=8, gralora_k=2, target_modules=TARGETS[name], init_weights=False,
                  task_type=MODEL_FACTORIES[name].task_type)
    if name == "gpt2":
        kwargs["fan_in_fan_out"] = True
    kwargs.update(overrides)
    return GraloraConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(12, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


def layer_of(config: GraloraConfig, name: str = "lin0") -> GraloraLinear:
    return getattr(get_peft_model(MLP(), config).base_model.model, name)


def reference_delta(layer: GraloraLinear, adapter: str = "default") -> torch.Tensor:
    """delta_W (out x in) block by block, straight from the definition: block (j, n) = (A_n^j B_j^n)^T."""
    factor_a, factor_b = layer.gralora_A[adapter].detach(), layer.gralora_B[adapter].detach()
    k, in_block, r = factor_a.shape
    out_block, s = factor_b.shape[-1], r // k
    delta = torch.zeros(k * out_block, k * in_block)
    for j in range(k):
        for n in range(k):
            a_chunk = factor_a[n][:, j * s:(j + 1) * s]  # in/k x s
            b_chunk = factor_b[j][n * s:(n + 1) * s, :]  # s x out/k
            delta[j * out_block:(j + 1) * out_block, n * in_block:(n + 1) * in_block] = (a_chunk @ b_chunk).T
    if layer.hybrid_r[adapter]:
        delta += layer.gralora_B_general[adapter].weight.detach() @ layer.gralora_A_general[adapter].weight.detach()
    return delta * layer.scaling[adapter]


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(GraloraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.GraloraConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gralora_k": 0}, "`gralora_k` should be a positive integer value but the value passed is 0"),
        ({"r": 6, "gralora_k": 4}, "r should be divisible by gralora_k, but got 6 and 4"),
        ({"r": 0}, "`r` should be a positive integer value"),
        ({"hybrid_r": -1}, "`hybrid_r` should be a non-negative integer value"),
        ({"gralora_dropout": 1.5}, "gralora_dropout=1.5 is invalid"),
        ({"bias": "lora_only"}, "bias='lora_only' is invalid"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian' is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GraloraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gralora_k": 3, "r": 3, "target_modules": ["lin0"]}, "out_features should be divisible by gralora_k, but got 8 and 3"),
        ({"gralora_k": 8, "r": 8, "target_modules": ["lin0"]}, "in_features should be divisible by gralora_k, but got 12 and 8"),
    ],
)
def test_layer_checks_refuse_and_leave_model_unchanged(kwargs, message):
    model = MLP()
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, GraloraConfig(**kwargs))
    assert type(model.lin0) is nn.Linear


def test_json_roundtrip_dispatches_to_gralora(tmp_path):
    GraloraConfig(r=8, hybrid_r=2, gralora_k=4, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is GraloraConfig and (loaded.r, loaded.hybrid_r, loaded.gralora_k) == (8, 2, 4)


def test_embeddings_are_not_wrapped():
    """peft raises a TypeError for an unsupported layer; ours is one too (and a TargetModulesError)."""
    with pytest.raises(TypeError, match="not supported by GraLoRA"):
        get_peft_model(llama(), GraloraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(TargetModulesError):
        get_peft_model(llama(), GraloraConfig(r=2, target_modules=["embed_tokens"]))


# ---------------------------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("k, r, hybrid_r", [(1, 3, 0), (2, 4, 0), (4, 8, 0), (2, 4, 3)])
def test_update_is_the_block_grid_of_low_rank_products(k, r, hybrid_r):
    layer = layer_of(GraloraConfig(r=r, gralora_k=k, hybrid_r=hybrid_r, alpha=5, target_modules=["lin0"],
                                   init_weights=False))
    assert layer.gralora_A["default"].shape == (k, 12 // k, r)
    assert layer.gralora_B["default"].shape == (k, r, 8 // k)
    assert layer.scaling["default"] == 5 / (r + hybrid_r)
    delta = reference_delta(layer)
    x = torch.randn(3, 5, 12)  # any leading dims
    with torch.no_grad():
        prop.assert_close(layer.get_delta_weight("default"), delta)
        prop.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)
        prop.assert_close(layer(x[0]), layer.base_layer(x[0]) + x[0] @ delta.T)  # 2-D input


def test_blocks_have_rank_r_over_k_and_the_update_more():
    layer = layer_of(GraloraConfig(r=4, gralora_k=2, target_modules=["lin0"], init_weights=False))
    delta = layer.get_delta_weight("default").detach()
    assert torch.linalg.matrix_rank(delta[:4, :6]) == 2  # one block: rank r / k
    assert torch.linalg.matrix_rank(delta) > 4 // 2


def test_parameter_count_depends_on_r_plus_hybrid_r_only():
    counts = {
        (r, k, h): get_peft_model(MLP(), GraloraConfig(r=r, gralora_k=k, hybrid_r=h, target_modules=["lin0"]))
        .get_nb_trainable_parameters()[0]
        for r, k, h in [(4, 2, 0), (2, 2, 2), (4, 4, 0)]
    }
    assert set(counts.values()) == {4 * (12 + 8)}, counts


def test_default_init_is_a_noop_with_random_a():
    layer = layer_of(GraloraConfig(r=4, hybrid_r=2, target_modules=["lin0"]))
    assert torch.count_nonzero(layer.gralora_B["default"]) == 0
    assert torch.count_nonzero(layer.gralora_B_general["default"].weight) == 0
    assert torch.count_nonzero(layer.gralora_A["default"]) == layer.gralora_A["default"].numel()
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_conv1d_update_is_transposed_and_config_corrected():
    model = gpt2()
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        peft_model = get_peft_model(model, GraloraConfig(r=4, target_modules=["c_attn"], init_weights=False))
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert (layer.in_features, layer.out_features) == (32, 96)
    delta = layer.get_delta_weight("default")
    assert delta.shape == layer.get_base_layer().weight.shape == (32, 96)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ delta)


def test_linear_with_fan_in_fan_out_warns_and_is_corrected():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        model = get_peft_model(MLP(), GraloraConfig(r=2, target_modules=["lin0"], fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is False


@pytest.mark.parametrize(
    "bias, trained, saved",
    [("none", set(), set()), ("all", {"lin0", "lin1"}, {"lin0.base_layer.bias", "lin1.bias"}),
     ("gralora_only", {"lin0"}, {"lin0.base_layer.bias"})],
)
def test_bias_options_train_and_save_biases(bias, trained, saved):
    model = get_peft_model(MLP(), GraloraConfig(r=2, target_modules=["lin0"], bias=bias))
    names = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert names == trained
    keys = {key.removeprefix("base_model.model.") for key in get_peft_model_state_dict(model)}
    assert keys == {"lin0.gralora_A", "lin0.gralora_B"} | saved  # the keys peft saves


def test_hybrid_keys_and_two_adapters_merged_and_unmerged():
    model = get_peft_model(MLP(), GraloraConfig(r=2, hybrid_r=2, target_modules=["lin0"], init_weights=False))
    keys = {key.removeprefix("base_model.model.") for key in get_peft_model_state_dict(model)}
    assert keys == {"lin0.gralora_A", "lin0.gralora_B", "lin0.gralora_A_general.weight", "lin0.gralora_B_general.weight"}
    model.add_adapter("other", GraloraConfig(r=4, gralora_k=4, target_modules=["lin0"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 12)
    with torch.no_grad():
        one = get_peft_model(MLP(), GraloraConfig(r=2, target_modules=["lin0"]))(x)
        both = model(x)
        assert not torch.allclose(both, one)
        model.merge_adapter()
        prop.assert_close(model(x), both)
        model.unmerge_adapter()
        prop.assert_close(model(x), both)


def test_bf16_base_keeps_float32_adapter_and_merges():
    model = get_peft_model(MLP().to(torch.bfloat16), GraloraConfig(r=4, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    assert layer.gralora_A["default"].dtype == torch.float32
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        unmerged = model(x)
        assert unmerged.dtype == torch.bfloat16
        model.merge_adapter()
        prop.assert_close(model(x).float(), unmerged.float(), atol=5e-2)


# ---------------------------------------------------------------------------------------------- quantized bases
def test_quantized_base_matches_dequantized_reference():
    inputs = lm_inputs()
    quant = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    config = GraloraConfig(r=4, hybrid_r=2, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(quantize_model(llama(), quant), config)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert type(layer) is GraloraLinear and isinstance(layer.get_base_layer(), Linear4bit)
    reference = get_peft_model(dequantize_model(quantize_model(llama(), quant), torch.float32), config)
    adapter_state = {k: v for k, v in model.state_dict().items() if "gralora_" in k}
    assert not reference.load_state_dict(adapter_state, strict=False).unexpected_keys
    got = prop.output_of(model, inputs)
    prop.assert_close(got, prop.output_of(reference, inputs), atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    merged = prop.output_of(model, inputs)
    assert float((merged - got).abs().mean()) < 0.5 * float(got.abs().mean())


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 2, "target_modules": TARGETS[name][:1]},
    fresh=({"init_weights": True, "hybrid_r": 0}, {"init_weights": True, "hybrid_r": 2}),
    merge=({"hybrid_r": 2},),
    roundtrip=({"hybrid_r": 2},),
    train=({"init_weights": True, "hybrid_r": 0}, {"init_weights": True, "hybrid_r": 2}),
    lr=2e-2,
))


