"""VeRA: config checks, the shared projections, layer math by hand, checkpoints, quantized bases, property suite."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import (
    ConfigError,
    PeftModel,
    TargetModulesError,
    VeraConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from peftkit.quantization import (
    Linear4bit,
    Linear8bit,
    QuantizationConfig,
    dequantize_model,
    quantize_model,
)
from peftkit.tuners.vera.layer import VeraLayer
from peftkit.tuners.vera.projection import draw_projections
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, llama, lm_inputs

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = ["llama", "gpt2", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]}


def config_for(name: str, **overrides) -> VeraConfig:
    """Random lambdas (init_weights=False): the adapter visibly moves the logits."""
    kwargs = dict(r=8, target_modules=TARGETS[name], init_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return VeraConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 6)
        self.emb = nn.Embedding(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"r": 2.5}, "r=2.5 is invalid"),
        ({"vera_dropout": 1.5}, "vera_dropout=1.5"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"projection_prng_key": "seed"}, "projection_prng_key='seed'"),
        ({"d_initial": float("nan")}, "d_initial=nan"),
        ({"save_projection": "yes"}, "save_projection='yes'"),
        ({"init_weights": None}, "init_weights=None"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VeraConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_save_projection_false_warns_as_peft():
    with pytest.warns(UserWarning, match="Specified to not save vera_A and vera_B"):
        VeraConfig(save_projection=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VeraConfig()


def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    import dataclasses

    ours = {f.name: f.default for f in dataclasses.fields(VeraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.VeraConfig)}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "peft_type"} == {k: v for k, v in theirs.items() if k != "peft_type"}


def test_default_targets_are_llama_attention():
    model = get_peft_model(llama(), VeraConfig(r=4))
    wrapped = {name.rpartition(".")[2] for name, _ in model.base_model.tuner_layers()}
    assert wrapped == {"q_proj", "v_proj"}


# ---------------------------------------------------------------------------------------------- projections
def test_projections_sized_for_largest_target_shared_and_reproducible():
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0", "lin1"], init_weights=False))
    tuner = model.base_model
    a, b = tuner.vera_A["default"], tuner.vera_B["default"]
    assert a.shape == (4, 20) and b.shape == (20, 4)  # in: max(10, 20), out: max(20, 6)
    expected_a, expected_b = draw_projections(4, 4, 20, 20, seed=0)
    assert torch.equal(a, expected_a) and torch.equal(b, expected_b)
    bound = (6 / 20) ** 0.5  # Kaiming-uniform, fan_in = the second dimension
    assert a.abs().max() <= bound and b.abs().max() <= (6 / 4) ** 0.5
    assert model.base_model.model.lin0.vera_A is tuner.vera_A is model.base_model.model.lin1.vera_A
    assert not a.requires_grad and all("vera_A" not in n for n, p in model.named_parameters())
    other = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0", "lin1"], projection_prng_key=5))
    assert not torch.equal(other.base_model.vera_A["default"], a)


def test_layer_math_by_hand():
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0", "lin1"], init_weights=False))
    layer = model.base_model.model.lin1  # in 20, out 6: slices of the (4, 20) / (20, 4) pair
    a = model.base_model.vera_A["default"][:, :20]
    b = model.base_model.vera_B["default"][:6, :]
    lambda_b, lambda_d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    delta = torch.diag(lambda_b) @ b @ torch.diag(lambda_d) @ a
    prop.assert_close(layer.get_delta_weight("default"), delta)
    x = torch.randn(3, 20)
    prop.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)


def test_init_weights_true_is_a_noop_with_d_initial():
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0"], d_initial=0.3))
    layer = model.base_model.model.lin0
    assert torch.all(layer.vera_lambda_b["default"] == 0)
    assert torch.allclose(layer.vera_lambda_d["default"], torch.full((4,), 0.3))
    x = torch.randn(2, 10)
    prop.assert_close(model(x), MLP()(x))


def test_conv1d_delta_is_transposed_and_fan_in_fan_out_fixed():
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        model = get_peft_model(MODEL_FACTORIES["gpt2"].make_model(), config_for("gpt2"))
    assert model.peft_config["default"].fan_in_fan_out is True
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape
    x = torch.randn(2, 32)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default"))


def test_unsupported_layer_is_a_type_error():
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0", "emb"]))


def test_no_compatible_layer_is_a_value_error():
    with pytest.raises(TargetModulesError, match="No layers types compatible with VeRA"):
        get_peft_model(MLP(), VeraConfig(r=4, target_modules=["emb"]))


# ---------------------------------------------------------------------------------------------- several adapters
def test_second_adapter_reuses_the_first_projections():
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0", "lin1"], init_weights=False))
    model.add_adapter("other", VeraConfig(r=4, target_modules=["lin1"], init_weights=False))
    tuner = model.base_model
    assert tuner.vera_A["other"] is tuner.vera_A["default"]
    x = torch.randn(3, 10)
    with torch.no_grad():
        first = model(x)
        model.set_adapter("other")
        second = model(x)
    prop.assert_differs(first, second)
    model.delete_adapter("default")
    assert set(tuner.vera_A) == {"other"}
    with torch.no_grad():
        prop.assert_close(model(x), second)


def test_second_adapter_with_smaller_rank_runs():
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0"], init_weights=False))
    model.add_adapter("small", VeraConfig(r=2, target_modules=["lin0"], init_weights=False))
    model.set_adapter("small")
    layer = model.base_model.model.lin0
    x = torch.randn(3, 10)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("small").T)


@pytest.mark.parametrize(
    "first, second, message",
    [
        ({"target_modules": ["lin1"]}, {"target_modules": ["lin0"]}, "vera_B has a size of 6 but 20 or greater"),
        ({"target_modules": ["lin0"]}, {"target_modules": ["lin1"]}, "vera_A has a size of 10 but 20 or greater"),
        ({"target_modules": ["lin0"]}, {"target_modules": ["lin0"], "r": 8}, "with a lower rank"),
        ({"target_modules": ["lin0"]}, {"target_modules": ["lin0"], "projection_prng_key": 1}, "PRNG initialisation key"),
        ({"target_modules": ["lin0"]}, {"target_modules": ["lin0"], "save_projection": False}, "saved for all adapters"),
    ],
)
def test_incompatible_second_adapter_is_refused_and_rolled_back(first, second, message):
    model = get_peft_model(MLP(), VeraConfig(r=4, **first))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model.add_adapter("other", VeraConfig(**{"r": 4, **second}))
    assert "other" not in model.peft_config and set(model.base_model.vera_A) == {"default"}
    assert set(model.state_dict()) == set(before)


def test_only_one_adapter_with_bias():
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0"], bias="all"))
    with pytest.raises(ConfigError, match="only 1 adapter with bias"):
        model.add_adapter("other", VeraConfig(r=4, target_modules=["lin0"], bias="vera_only"))


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_keys(tmp_path):
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0", "lin1"], init_weights=False))
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == {
        "base_model.vera_A", "base_model.vera_B",
        "base_model.model.lin0.vera_lambda_b", "base_model.model.lin0.vera_lambda_d",
        "base_model.model.lin1.vera_lambda_b", "base_model.model.lin1.vera_lambda_d",
    }
    assert saved["base_model.vera_A"].shape == (4, 20) and saved["base_model.model.lin1.vera_lambda_b"].shape == (6,)


def test_save_projection_false_rebuilds_from_the_key(tmp_path):
    config = VeraConfig(r=4, target_modules=["lin0", "lin1"], init_weights=False, save_projection=False,
                        projection_prng_key=11)
    model = get_peft_model(MLP(), config)
    x = torch.randn(3, 10)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(str(tmp_path))
    assert not any("vera_A" in key for key in load_file(str(tmp_path / "adapter_model.safetensors")))
    with pytest.warns(UserWarning, match="relying on PRNG initialisation"):
        loaded = PeftModel.from_pretrained(MLP(), str(tmp_path))
    with torch.no_grad():
        prop.assert_close(loaded(x), expected, atol=0)


def test_missing_projections_with_save_projection_true_raise(tmp_path):
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0"], init_weights=False))
    state = {k: v for k, v in get_peft_model_state_dict(model).items() if "vera_A" not in k and "vera_B" not in k}
    from peftkit import set_peft_model_state_dict

    with pytest.raises(ValueError, match="however they were not present"):
        set_peft_model_state_dict(model, state)


def test_flipping_save_projection_after_init_is_refused(tmp_path):
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0"], save_projection=False))
    model.peft_config["default"].save_projection = True
    with pytest.raises(ValueError, match="config now specifies to save projection"):
        model.save_pretrained(str(tmp_path))


def test_bias_vera_only_trains_and_saves_the_wrapped_biases(tmp_path):
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0"], bias="vera_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.lin0.base_layer.bias" in trainable and "base_model.model.lin1.bias" not in trainable
    assert "base_model.model.lin0.base_layer.bias" in get_peft_model_state_dict(model)


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("quant", [{"load_in_4bit": True}, {"load_in_8bit": True}], ids=["nf4", "int8"])
def test_quantized_base_matches_dequantized_and_merges(quant):
    inputs = lm_inputs()
    config = VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(**quant)), config)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, VeraLayer) and isinstance(layer.get_base_layer(), (Linear4bit, Linear8bit))
    reference = get_peft_model(dequantize_model(quantize_model(llama(), QuantizationConfig(**quant)), torch.float32),
                               VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM"))
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "vera_" in k}, strict=False)
    with torch.no_grad():
        got = model(**inputs).logits
        prop.assert_close(got, reference(**inputs).logits, atol=1e-4)
        with model.disable_adapter():
            prop.assert_differs(model(**inputs).logits, got)
        base = layer.get_base_layer()
        target = base.dequantize_weight(torch.float32) + layer.get_delta_weight("default")
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        merged = layer.get_base_layer().dequantize_weight(torch.float32)
    assert layer.merged
    # Re-quantizing the merged weight costs about one code step per entry, far below the weights' size.
    assert (merged - target).abs().mean() < 0.1 * target.abs().mean()


# ---------------------------------------------------------------------------------------------- property suite
@pytest.mark.parametrize("name", CASES)
def test_merge_equals_unmerged(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_merge_unmerge_restores_weights(name):
    prop.check_merge_unmerge_restores_weights(MODEL_FACTORIES[name].make_model, config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_disable_gives_base(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_disable_gives_base(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_save_load_roundtrip(name, tmp_path):
    tiny = MODEL_FACTORIES[name]
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config_for(name), tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_only_adapter_params_train(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_only_adapter_params_train(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_adapters_switch(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_adapters_switch(tiny.make_model, tiny.make_inputs(), config_for(name), config_for(name, d_initial=0.5))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_training_lowers_loss(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_training_lowers_loss(tiny.make_model, tiny.make_inputs(), config_for(name, init_weights=True, r=16),
                                    lr=5e-2)


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_is_noop(name):
    tiny = MODEL_FACTORIES[name]
    prop.fresh_adapter_is_noop(tiny.make_model, tiny.make_inputs(), config_for(name, init_weights=True))


def test_projections_in_a_checkpoint_of_a_save_projection_false_adapter_are_ignored():
    from peftkit import set_peft_model_state_dict

    with_projection = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0"], init_weights=False,
                                                      projection_prng_key=3))
    state = get_peft_model_state_dict(with_projection)
    model = get_peft_model(MLP(), VeraConfig(r=4, target_modules=["lin0"], save_projection=False))
    with pytest.warns(UserWarning, match="however they are present"):
        result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys and not result.missing_keys
    assert not torch.equal(model.base_model.vera_A["default"], with_projection.base_model.vera_A["default"])
    layer = model.base_model.model.lin0
    assert torch.equal(layer.vera_lambda_d["default"], with_projection.base_model.model.lin0.vera_lambda_d["default"])
