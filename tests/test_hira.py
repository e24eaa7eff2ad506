"""HiRA: config checks, the Hadamard update by hand (Linear, Conv1D, Embedding, convs), merging in
W0, quantized bases, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from peftkit import ConfigError, HiraConfig, PeftConfig, get_peft_model
from peftkit.quantization import Linear4bit, Linear8bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.hira.layer import Conv2d as HiraConv2d
from peftkit.tuners.hira.layer import Embedding as HiraEmbedding
from peftkit.tuners.hira.layer import Linear as HiraLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"],
           "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> HiraConfig:
    """Rank 2, random A and B (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(r=2, target_modules=TARGETS[name], init_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return HiraConfig(**kwargs)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(2, 4, kernel_size=3, padding=1)
        self.grouped = nn.Conv2d(4, 4, kernel_size=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x))


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(HiraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.HiraConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    assert HiraConfig().r == 32 and HiraConfig().init_weights is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"r": 2.5}, "r=2.5 is invalid"),
        ({"hira_dropout": 1.5}, "hira_dropout=1.5 is invalid"),
        ({"init_weights": "kaiming"}, "Unknown initialization"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "`layers_to_transform` cannot be used"),
        ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "`layers_pattern` cannot be used"),
        ({"rank_pattern": {"q_proj": -1}}, r"rank_pattern\['q_proj'\]=-1 is invalid"),
        ({"fan_in_fan_out": "yes"}, "fan_in_fan_out='yes' is invalid"),
        ({"target_modules": [1]}, "strings"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HiraConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_json_roundtrip_dispatches_to_hira(tmp_path):
    HiraConfig(r=3, init_weights="gaussian", hira_dropout=0.1, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is HiraConfig
    assert (loaded.r, loaded.init_weights, loaded.hira_dropout, loaded.target_modules) == (3, "gaussian", 0.1, {"q_proj"})


def test_default_targets_are_query_value():
    model = get_peft_model(llama(), HiraConfig(r=2))
    assert sorted({key.rpartition(".")[2] for key, _ in model.base_model.tuner_layers()}) == ["q_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------- the maths
def test_linear_update_is_hadamard_with_base_weight():
    model = get_peft_model(Net(), HiraConfig(r=3, target_modules=["lin"], init_weights=False))
    layer = model.base_model.model.lin
    assert type(layer) is HiraLinear
    a, b, w = layer.hira_A["default"], layer.hira_B["default"], layer.base_layer.weight
    assert a.shape == (3, 6) and b.shape == (5, 3)
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ (w * (b @ a)).T
        prop.assert_close(layer(x), expected)
        prop.assert_close(layer.get_delta_weight("default"), b @ a)


def test_conv1d_gpt2_uses_transposed_layout():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        model = get_peft_model(gpt2(), HiraConfig(r=2, target_modules=["c_attn"], init_weights=False))
    assert model.peft_config["default"].fan_in_fan_out is False  # peft leaves the config as it is
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.is_target_conv_1d_layer
    a, b, w = layer.hira_A["default"], layer.hira_B["default"], layer.base_layer.weight  # w: (in, out)
    x = torch.randn(3, 32)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ (w * (b @ a).T))
        assert layer.get_delta_weight("default").shape == w.shape


def test_fan_in_fan_out_on_linear_warns_as_peft():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        get_peft_model(Net(), HiraConfig(target_modules=["lin"], fan_in_fan_out=True))


def test_embedding_lookup_by_hand_and_identity_init():
    model = get_peft_model(Net(), HiraConfig(r=2, target_modules=["emb"]))
    layer = model.base_model.model.emb
    assert type(layer) is HiraEmbedding
    assert torch.equal(layer.hira_embedding_A["default"], torch.zeros(2, 10))  # A = 0: a no-op
    with torch.no_grad():
        layer.hira_embedding_A["default"].normal_()
    ids = torch.tensor([[1, 4, 9], [0, 0, 3]])
    a, b, table = layer.hira_embedding_A["default"], layer.hira_embedding_B["default"], layer.base_layer.weight
    with torch.no_grad():
        prop.assert_close(layer(ids), (table + table * (b @ a).T)[ids])


def test_conv_modulation_by_hand():
    model = get_peft_model(Net(), HiraConfig(r=2, target_modules=["conv"], init_weights=False))
    layer = model.base_model.model.conv
    assert type(layer) is HiraConv2d
    a, b = layer.hira_A["default"], layer.hira_B["default"]  # (r, in, 3, 3), (out, r, 1, 1)
    assert a.shape == (2, 2, 3, 3) and b.shape == (4, 2, 1, 1)
    modulation = torch.zeros(4, 2, 3, 3)
    for rank in range(2):
        modulation += b[:, rank, 0, 0][:, None, None, None] * a[rank][None]
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        prop.assert_close(layer.get_delta_weight("default"), modulation)
        expected = layer.base_layer(x) + nn.functional.conv2d(x, layer.base_layer.weight * modulation, padding=1)
        prop.assert_close(layer(x), expected)


def test_grouped_conv_is_refused_and_nothing_changes():
    model = Net()
    with pytest.raises(NotImplementedError, match="groups > 1"):
        get_peft_model(model, HiraConfig(target_modules=["conv", "grouped"]))
    assert type(model.conv) is nn.Conv2d and type(model.grouped) is nn.Conv2d


@pytest.mark.parametrize("init, a_zero, b_zero", [(True, False, True), ("gaussian", False, True), (False, False, False)])
def test_init_variants(init, a_zero, b_zero):
    layer = get_peft_model(Net(), HiraConfig(r=4, target_modules=["lin"], init_weights=init)).base_model.model.lin
    a, b = layer.hira_A["default"], layer.hira_B["default"]
    assert bool((a == 0).all()) is a_zero and bool((b == 0).all()) is b_zero
    if init == "gaussian":
        assert 0.1 < float(a.std()) < 0.5  # N(0, 1/r^2) with r = 4


def test_fused_forward_equals_separate_forward():
    """A hook on the base disables the one-matmul path; both paths give the same output."""
    model = get_peft_model(Net(), HiraConfig(r=2, target_modules=["lin"], init_weights=False))
    layer = model.base_model.model.lin
    x = torch.randn(3, 6)
    with torch.no_grad():
        fused = layer(x)
        handle = layer.base_layer.register_forward_hook(lambda *_: None)
        separate = layer(x)
        handle.remove()
    prop.assert_close(fused, separate)


def test_dropout_applies_to_adapter_input_only_in_training():
    model = get_peft_model(Net(), HiraConfig(r=2, target_modules=["lin"], init_weights=False, hira_dropout=0.5))
    layer = model.base_model.model.lin
    x = torch.randn(8, 6)
    with torch.no_grad():
        layer.eval()
        evaluated = layer(x)
        layer.train()
        torch.manual_seed(0)
        trained = layer(x)
    assert not torch.allclose(evaluated, trained)
    w, m = layer.base_layer.weight, layer.get_delta_weight("default")
    prop.assert_close(evaluated, layer.base_layer(x).detach() + x @ (w * m).T.detach())


# ---------------------------------------------------------------------------------------------- merging
def test_adapters_merged_in_turn_fold_into_w0_and_unmerge_exactly():
    model = get_peft_model(Net(), HiraConfig(r=2, target_modules=["lin"], init_weights=False))
    model.add_adapter("other", HiraConfig(r=3, target_modules=["lin"], init_weights=False))
    layer = model.base_model.model.lin
    w0 = layer.base_layer.weight.detach().clone()
    model.merge_adapter(["default"])
    model.merge_adapter(["other"])
    expected = w0 + w0 * (layer.get_delta_weight("default") + layer.get_delta_weight("other"))
    prop.assert_close(layer.base_layer.weight, expected.detach())
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0)
    assert layer._base_weight_before_merge is None


def test_safe_merge_refuses_nan_and_keeps_weights():
    model = get_peft_model(Net(), HiraConfig(r=2, target_modules=["lin"], init_weights=False))
    layer = model.base_model.model.lin
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.hira_A["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_rank_pattern_applies_to_added_adapters_only_as_peft():
    model = get_peft_model(Net(), HiraConfig(r=2, target_modules=["lin"], rank_pattern={"lin": 4}))
    model.add_adapter("other", HiraConfig(r=2, target_modules=["lin"], rank_pattern={"lin": 4}))
    layer = model.base_model.model.lin
    assert layer.r == {"default": 2, "other": 4}


# ---------------------------------------------------------------------------------------------- quantized bases
QUANTS = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "int8": {"load_in_8bit": True}}


@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_quantized_base_matches_dequantized_reference(quant):
    inputs = lm_inputs()
    config = HiraConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(5)
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(**QUANTS[quant])), config)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert type(layer) is HiraLinear and isinstance(layer.get_base_layer(), (Linear4bit, Linear8bit))
    reference = get_peft_model(dequantize_model(quantize_model(llama(), QuantizationConfig(**QUANTS[quant])), torch.float32), config)
    adapter = {k: v for k, v in model.state_dict().items() if "hira_" in k}
    assert not reference.load_state_dict(adapter, strict=False).unexpected_keys
    expected = prop.output_of(reference, inputs)
    got = prop.output_of(model, inputs)
    prop.assert_close(got, expected, atol=1e-4)
    with model.disable_adapter():
        base_logits = prop.output_of(model, inputs)
    prop.assert_differs(base_logits, got)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    merged = prop.output_of(model, inputs)  # re-quantized: near the adapted output, not exact
    assert float((merged - got).abs().mean()) < 0.5 * float((base_logits - got).abs().mean())
    model.unmerge_adapter()
    prop.assert_close(prop.output_of(model, inputs), got, atol=5e-2)


def test_quantized_training_updates_only_adapters():
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(**QUANTS["nf4"])),
                           HiraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    base = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    codes = base.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**lm_inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(base.weight, codes)


# ---------------------------------------------------------------------------------------------- properties
CASES = list(TARGETS)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 3, "target_modules": TARGETS[name][:1]},
    fresh=({"init_weights": True}, {"init_weights": "gaussian"}),
))


