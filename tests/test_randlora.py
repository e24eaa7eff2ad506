"""RandLoRA: config checks, shared random bases, layer math by hand, quantized bases, property suite."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import ConfigError, PeftModel, RandLoraConfig, get_peft_model
from peftkit.quantization import QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.randlora.bases import make_bases, num_bases
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, llama, lm_inputs

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = ["llama", "gpt2", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]}


def config_for(name: str, **overrides) -> RandLoraConfig:
    """lambda ~ N(0, 1) (init_weights=False): a non-trivial adapter."""
    kwargs = dict(r=4, randlora_alpha=8, target_modules=TARGETS[name], init_weights=False,
                  task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return RandLoraConfig(**kwargs)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"randlora_dropout": 1.0}, "randlora_dropout=1.0"),
        ({"randlora_alpha": float("inf")}, "randlora_alpha=inf"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"sparse": "yes"}, "sparse='yes'"),
        ({"projection_prng_key": 1.5}, "projection_prng_key=1.5"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RandLoraConfig(**kwargs)


def test_fields_defaults_and_warning_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f.default for f in dataclasses.fields(RandLoraConfig) if f.name != "peft_type"}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.RandLoraConfig) if f.name != "peft_type"}
    assert ours == theirs
    with pytest.warns(UserWarning, match="restored using the PRNG key"):
        RandLoraConfig(save_projection=False)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_RANDLORA_TARGET_MODULES_MAPPING

    from peftkit.tuners.randlora import RandLoraModel

    assert RandLoraModel.default_target_modules == TRANSFORMERS_MODELS_TO_RANDLORA_TARGET_MODULES_MAPPING


def test_incompatible_adapters_are_refused():
    model = get_peft_model(_mlp(), RandLoraConfig(target_modules=["2"], r=2))
    with pytest.raises(ConfigError, match="PRNG initialisation key must be the same"):
        model.add_adapter("b", RandLoraConfig(target_modules=["2"], r=2, projection_prng_key=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = RandLoraConfig(target_modules=["2"], r=2, save_projection=False)
    with pytest.raises(ConfigError, match="saved for all adapters or none"):
        model.add_adapter("c", other)
    with pytest.raises(ConfigError, match="randlora_A has a size of .* but 8 or greater"):  # bases sized for (4, 12)
        model.add_adapter("d", RandLoraConfig(target_modules=["0"], r=2))
    with pytest.raises(ConfigError, match="No layers types compatible"):
        get_peft_model(llama(), RandLoraConfig(target_modules=["embed_tokens"]))
    assert sorted(model.peft_config) == ["default"] and list(model.base_model.randlora_A) == ["default"]


# ---------------------------------------------------------------------------------------------- bases
def test_bases_are_seeded_sized_by_the_largest_target_and_shared():
    model = get_peft_model(_mlp(), RandLoraConfig(target_modules=["0", "2"], r=3))
    tuner = model.base_model
    basis_a, basis_b = tuner.randlora_A["default"], tuner.randlora_B["default"]
    # largest (out, in) = (12, 12): max 12, min 12, ceil(12 / 3) = 4 bases
    assert basis_a.shape == (3, 1, 12) and basis_b.shape == (12, 4, 3)
    expected_a, expected_b = make_bases(tuner.peft_config["default"], 12, 12)
    assert torch.equal(basis_a, expected_a.float()) and torch.equal(basis_b, expected_b.float())
    layers = [layer for _, layer in tuner.tuner_layers()]
    assert all(layer.randlora_A is tuner.randlora_A for layer in layers)
    assert not any(b.requires_grad for b in model.buffers())
    again = get_peft_model(_mlp(), RandLoraConfig(target_modules=["0", "2"], r=3))
    assert torch.equal(again.base_model.randlora_B["default"], basis_b)


@pytest.mark.parametrize("flag, density", [("sparse", 1 / 3), ("very_sparse", 1 / 12**0.5)])
def test_sparse_bases_are_ternary(flag, density):
    basis_a, basis_b = make_bases(RandLoraConfig(r=4, **{flag: True}), 48, 12)
    values = torch.unique(torch.sign(basis_b))
    assert set(values.tolist()) <= {-1.0, 0.0, 1.0}
    assert abs(float((basis_b != 0).float().mean()) - density) < 0.15
    assert len(torch.unique(basis_b.abs()[basis_b != 0])) == 1  # one magnitude: +-1 / std


def test_num_bases():
    assert [num_bases(12, r) for r in (1, 3, 5, 12, 20)] == [12, 4, 3, 1, 1]


# ---------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("sizes", [(8, 12), (12, 4)])
def test_delta_weight_by_hand(sizes):
    torch.manual_seed(0)
    base = nn.Linear(*sizes)
    model = get_peft_model(nn.Sequential(base), RandLoraConfig(target_modules=["0"], r=3, randlora_alpha=6, init_weights=False))
    layer = model.base_model.model[0]
    small, large = sorted(sizes)
    count = num_bases(small, 3)
    lam, gamma = layer.randlora_lambda["default"], layer.randlora_gamma["default"]
    assert lam.shape == (3, count) and gamma.shape == (count, small)
    basis_a, basis_b = layer.randlora_A["default"], layer.randlora_B["default"]
    delta = torch.zeros(large, small)
    for i in range(3):
        for b in range(count):
            row = lam[i, b] * basis_a[i, 0, :small] * gamma[b]  # row i * count + b of the scaled factor
            flat = i * count + b
            column = basis_b[:large, flat // 3, flat % 3]  # column b' * r + i' of the spread factor
            delta += torch.outer(column, row)
    delta = delta * 2.0
    expected = delta if small == sizes[0] else delta.T
    prop.assert_close(layer.get_delta_weight("default"), expected, atol=1e-5)
    x = torch.randn(3, sizes[0])
    prop.assert_close(layer(x), base(x) + x @ expected.T, atol=1e-5)


def test_default_init_is_a_noop_and_gamma_matches_peft():
    model = get_peft_model(_mlp(), RandLoraConfig(target_modules=["0"], r=3))
    layer = model.base_model.model[0]
    assert torch.count_nonzero(layer.randlora_lambda["default"]) == 0
    assert torch.allclose(layer.randlora_gamma["default"], torch.full((3, 8), 1 / 8))  # 1 / max(n=3, min=8)
    x = torch.randn(2, 8)
    with model.disable_adapter():
        base = model(x)
    prop.assert_close(model(x), base)


def test_conv1d_delta_is_transposed():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(Conv1D(8, 4)), RandLoraConfig(target_modules=["0"], r=2, init_weights=False))
    layer = model.base_model.model[0]
    assert layer.get_delta_weight("default").shape == (4, 8)
    x = torch.randn(3, 4)
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default"))


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("save_projection", [True, False])
def test_checkpoint_keys(save_projection, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = RandLoraConfig(target_modules=["0", "2"], r=3, init_weights=False, save_projection=save_projection)
    model = get_peft_model(_mlp(), config)
    x = torch.randn(2, 8)
    expected = model(x)
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    per_layer = [f"base_model.model.{i}.randlora_{n}" for i in (0, 2) for n in ("lambda", "gamma")]
    bases = [f"base_model.model.{i}.randlora_{n}" for i in (0, 2) for n in ("A", "B")]
    bases += ["base_model.randlora_A", "base_model.randlora_B"]
    assert keys == sorted(per_layer + (bases if save_projection else []))
    loaded = PeftModel.from_pretrained(_mlp(), str(tmp_path))
    prop.assert_close(loaded(x), expected)


def test_second_adapter_borrows_the_bases():
    model = get_peft_model(_mlp(), RandLoraConfig(target_modules=["0", "2"], r=3, init_weights=False))
    model.add_adapter("other", RandLoraConfig(target_modules=["0"], r=3, init_weights=False))
    tuner = model.base_model
    assert tuner.randlora_B["other"] is tuner.randlora_B["default"]
    assert model.base_model.model[2].adapter_names() == ["default"]
    model.delete_adapter("default")
    assert list(tuner.randlora_A) == ["other"] and isinstance(model.base_model.model[2], nn.Linear)


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("quant", [{"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, {"load_in_8bit": True}])
def test_quantized_base_matches_dequantized_reference_and_merges(quant):
    inputs = lm_inputs()
    config = config_for("llama", target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    quantized = quantize_model(llama(), QuantizationConfig(**quant))
    dequantized = dequantize_model(quantize_model(llama(), QuantizationConfig(**quant)), torch.float32)
    torch.manual_seed(4)
    model = get_peft_model(quantized, config)
    torch.manual_seed(4)  # the same lambdas
    reference = get_peft_model(dequantized, config)
    with torch.no_grad():
        got, expected = model(**inputs).logits, reference(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    prop.assert_close(got, expected, atol=1e-4)
    prop.assert_differs(got, base)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.get_base_layer().dequantize_weight(torch.float32)
    with torch.no_grad():
        wanted = before + layer.get_delta_weight("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    after = layer.get_base_layer().dequantize_weight(torch.float32)
    # re-quantized: W + delta_W up to the format's rounding (far below the change itself)
    assert (after - wanted).abs().max() < 0.2 * wanted.abs().max() < (after - before).abs().max() * 10
    assert (after - wanted).abs().mean() < 0.5 * (wanted - before).abs().mean()


# ---------------------------------------------------------------------------------------------- properties
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


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_adapters_switch(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_adapters_switch(tiny.make_model, tiny.make_inputs(), config_for(name), config_for(name, randlora_alpha=3))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_lowers_loss(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_training_lowers_loss(tiny.make_model, tiny.make_inputs(), config_for(name, init_weights=True), lr=2e-2)


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_is_noop(name):
    tiny = MODEL_FACTORIES[name]
    prop.fresh_adapter_is_noop(tiny.make_model, tiny.make_inputs(), config_for(name, init_weights=True))
