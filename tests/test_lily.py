"""Lily: config checks, the routed update by hand, A/B sharing across layers, no merging, quantized
bases, and the shared property suite (merging excepted) on tiny transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftkit import ConfigError, LilyConfig, PeftkitError, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peftkit.quantization import Linear4bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.lily.layer import Linear as LilyLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> LilyConfig:
    """Rank 4, 3 Bs, random Bs (init_weights=False): a non-trivial adapter, the case's targets and task."""
    kwargs = dict(r=4, num_B=3, target_modules=TARGETS[name], init_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return LilyConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


class Stack(nn.Module):
    """Five blocks of (proj 6 -> 6, out 6 -> 6): one target name, one shape, five layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(6, 6), "out": nn.Linear(6, 6)}) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block["out"](block["proj"](x)))
        return x


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(LilyConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.LilyConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    assert (LilyConfig().r, LilyConfig().stride_A, LilyConfig().num_B, LilyConfig().scaling) == (32, 1, 2, 1.0)



def test_default_targets_are_pefts():
    constants = pytest.importorskip("peft.utils.constants")
    from peftkit.tuners.lily.model import LILY_TARGET_MODULES_BY_MODEL_TYPE, TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING

    assert TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING is LILY_TARGET_MODULES_BY_MODEL_TYPE
    assert LILY_TARGET_MODULES_BY_MODEL_TYPE == dict(constants.TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING)
    model = llama()
    wrapped = get_peft_model(model, LilyConfig(r=2))
    assert sorted(wrapped.peft_config["default"].target_modules) == ["q_proj", "v_proj"]

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"stride_A": 0}, "`stride_A` must be at least 1"),
        ({"num_B": 1}, "`num_B` must be at least 2 for the router to be trained"),
        ({"scaling": "big"}, "scaling='big' is invalid"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian' is invalid"),
        ({"target_modules": ["q"], "layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
        ({"target_modules": ".*q", "layers_to_transform": 0}, "`layers_to_transform` cannot be used"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LilyConfig(**kwargs)


def test_json_roundtrip_dispatches_to_lily(tmp_path):
    LilyConfig(r=6, stride_A=3, num_B=4, scaling=0.5, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is LilyConfig and (loaded.r, loaded.stride_A, loaded.num_B, loaded.scaling) == (6, 3, 4, 0.5)


def test_only_linear_layers_are_wrapped_and_the_model_is_left_unchanged():
    model = gpt2()
    with pytest.raises(NotImplementedError, match="Lily does not support target modules of type"):
        get_peft_model(model, LilyConfig(r=2, target_modules=["c_attn"]))
    assert not any(isinstance(m, LilyLinear) for m in model.modules())


# ---------------------------------------------------------------------------------------------- the maths
def test_routed_update_by_hand():
    config = LilyConfig(r=3, num_B=4, scaling=0.7, target_modules=["lin0"], init_weights=False)
    layer = get_peft_model(MLP(), config).base_model.model.lin0
    A = layer.lily_A["default"].weight.detach()  # 3 x 10
    stacked = layer.lily_B["default"].weight.detach()  # (4 * 3) x 8
    R = layer.lily_router["default"].weight.detach()  # 4 x 3
    assert (A.shape, stacked.shape, R.shape) == ((3, 10), (12, 8), (4, 3))
    x = torch.randn(2, 5, 10)
    hidden = x @ A.T
    p = torch.softmax(hidden @ R.T, dim=-1).reshape(-1, 4).mean(0)  # one mix for the whole batch
    B = sum(p[e] * stacked[3 * e: 3 * e + 3] for e in range(4))  # 3 x 8
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + 0.7 * hidden @ B)


def test_the_mix_is_shared_by_the_whole_batch():
    model = get_peft_model(MLP(), LilyConfig(r=2, target_modules=["lin0"], init_weights=False))
    x = torch.randn(6, 10)
    with torch.no_grad():
        together = model(x)
        alone = model(x[:1])
        # as peft: the router's probabilities are averaged over every token of the call
        assert not torch.allclose(together[:1], alone, atol=1e-6)
        prop.assert_close(model(x[:1].repeat(3, 1))[:1], alone)


@pytest.mark.parametrize("stride_A, leaders", [(1, [0, 1, 2, 3, 4]), (2, [0, 0, 2, 2, 4]), (3, [0, 0, 0, 3, 3])])
def test_a_shared_per_stride_and_b_shared_per_target(stride_A, leaders):
    model = get_peft_model(Stack(), LilyConfig(r=2, stride_A=stride_A, target_modules=["proj", "out"]))
    blocks = model.base_model.model.blocks
    for name in ("proj", "out"):
        layers = [block[name] for block in blocks]
        assert all(layer.lily_A["default"] is layers[lead].lily_A["default"] for layer, lead in zip(layers, leaders))
        assert len({id(layer.lily_A["default"]) for layer in layers}) == len(set(leaders))
        assert all(layer.lily_B["default"] is layers[0].lily_B["default"] for layer in layers)
        assert len({id(layer.lily_router["default"]) for layer in layers}) == 5  # routers stay per layer
    assert blocks[0]["proj"].lily_B["default"] is not blocks[0]["out"].lily_B["default"]  # never across targets
    # each shared tensor trains once: the count is peft's
    per_target = 2 * 6 * len(set(leaders)) + 4 * 6 + 5 * (2 * 2)
    assert model.get_nb_trainable_parameters()[0] == 2 * per_target


def test_shared_tensors_are_saved_under_every_layer_and_reload_shared(tmp_path):
    model = get_peft_model(Stack(), LilyConfig(r=2, stride_A=5, target_modules=["proj"], init_weights=False))
    state = get_peft_model_state_dict(model)
    assert len(state) == 15 and all(k.endswith((".lily_A.weight", ".lily_B.weight", ".lily_router.weight")) for k in state)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(Stack(), str(tmp_path), is_trainable=True)
    blocks = loaded.base_model.model.blocks
    assert all(block["proj"].lily_A["default"] is blocks[0]["proj"].lily_A["default"] for block in blocks)
    with torch.no_grad():
        prop.assert_close(loaded(x), expected, atol=0)
    with torch.no_grad():  # one tensor: a change through one layer is seen by all
        blocks[3]["proj"].lily_B["default"].weight.add_(1.0)
    assert torch.equal(blocks[0]["proj"].lily_B["default"].weight, blocks[3]["proj"].lily_B["default"].weight)


def test_merging_is_refused_and_nothing_changes():
    model = get_peft_model(MLP(), LilyConfig(r=2, target_modules=["lin0"], init_weights=False))
    weight = model.base_model.model.lin0.base_layer.weight.detach().clone()
    for call in (model.merge_adapter, model.merge_and_unload, model.unmerge_adapter):
        with pytest.raises(NotImplementedError, match="not supported for Lily") as info:  # peft's type and words
            call()
        assert isinstance(info.value, PeftkitError) and "cannot be merged" in str(info.value)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, weight)
    assert isinstance(model.base_model.model.lin0, LilyLinear)
    unloaded = model.unload()
    assert type(unloaded.lin0) is nn.Linear and torch.equal(unloaded.lin0.weight, weight)


def test_second_adapter_has_its_own_sharing():
    model = get_peft_model(Stack(), LilyConfig(r=2, stride_A=2, target_modules=["proj"], init_weights=False))
    model.add_adapter("other", LilyConfig(r=3, stride_A=5, target_modules=["proj"], init_weights=False))
    blocks = model.base_model.model.blocks
    assert len({id(block["proj"].lily_A["default"]) for block in blocks}) == 3
    assert len({id(block["proj"].lily_A["other"]) for block in blocks}) == 1
    x = torch.randn(2, 6)
    with torch.no_grad():
        first = model(x)
        model.set_adapter("other")
        assert not torch.allclose(model(x), first)


def test_quantized_base_matches_dequantized_reference():
    inputs = lm_inputs()
    quant = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    config = LilyConfig(r=4, stride_A=2, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(quantize_model(llama(), quant), config)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert type(layer) is LilyLinear and isinstance(layer.get_base_layer(), Linear4bit)
    reference = get_peft_model(dequantize_model(quantize_model(llama(), quant), torch.float32), config)
    result = reference.load_state_dict({k: v for k, v in model.state_dict().items() if "lily_" in k}, strict=False)
    assert not result.unexpected_keys
    prop.assert_close(prop.output_of(model, inputs), prop.output_of(reference, inputs), atol=1e-4)
    prop.check_training_lowers_loss(lambda: quantize_model(llama(), quant), inputs, config, lr=2e-2)


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 2, "target_modules": TARGETS[name][:1]},
    roundtrip=({"stride_A": 2},),
    train=({"init_weights": True}, {"init_weights": False}),
    lr=2e-2,
    mergeable=False,
))
