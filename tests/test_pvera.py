"""PVeRA: config checks, sampling (mean in eval, reproducible generators), merge = the mean, property suite."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, PveraConfig, get_peft_model
from peftkit.quantization import Linear4bit, QuantizationConfig, quantize_model
from peftkit.tuners.pvera.layer import PveraLayer
from peftkit.tuners.vera.projection import draw_projections
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, llama, lm_inputs

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = ["llama", "gpt2", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"]}


def config_for(name: str, **overrides) -> PveraConfig:
    kwargs = dict(r=8, target_modules=TARGETS[name], init_weights=False, task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return PveraConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 6)
        self.emb = nn.Embedding(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def mlp_model(**overrides):
    kwargs = dict(r=4, target_modules=["lin0", "lin1"], init_weights=False)
    kwargs.update(overrides)
    return get_peft_model(MLP(), PveraConfig(**kwargs))


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"pvera_dropout": -0.1}, "pvera_dropout=-0.1"),
        ({"bias": "vera_only"}, "bias='vera_only'"),
        ({"generator_seed": 1.5}, "generator_seed=1.5"),
        ({"sample_at_inference": 1}, "sample_at_inference=1"),
        ({"projection_prng_key": None}, "projection_prng_key=None"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PveraConfig(**kwargs)


def test_save_projection_false_warns_as_peft():
    with pytest.warns(UserWarning, match="Specified to not save pvera_A and pvera_B"):
        PveraConfig(save_projection=False)


def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    import dataclasses

    ours = {f.name: f.default for f in dataclasses.fields(PveraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.PveraConfig)}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "peft_type"} == {k: v for k, v in theirs.items() if k != "peft_type"}


# ---------------------------------------------------------------------------------------------- math
def test_projection_shapes_and_checkpoint_keys(tmp_path):
    model = mlp_model()
    tuner = model.base_model
    assert tuner.pvera_A["default"].shape == (8, 20) and tuner.pvera_B["default"].shape == (20, 4)
    expected_a, expected_b = draw_projections(8, 4, 20, 20, seed=0)
    assert torch.equal(tuner.pvera_A["default"], expected_a) and torch.equal(tuner.pvera_B["default"], expected_b)
    assert model.base_model.model.lin0.pvera_lambda_d["default"].shape == (8,)
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == {
        "base_model.pvera_A", "base_model.pvera_B",
        "base_model.model.lin0.pvera_lambda_b", "base_model.model.lin0.pvera_lambda_d",
        "base_model.model.lin1.pvera_lambda_b", "base_model.model.lin1.pvera_lambda_d",
    }


def test_eval_uses_the_mean_and_merge_folds_it():
    model = mlp_model()
    layer = model.base_model.model.lin1
    a = model.base_model.pvera_A["default"][:, :20]
    b = model.base_model.pvera_B["default"][:6, :]
    lambda_b, lambda_d = layer.pvera_lambda_b["default"], layer.pvera_lambda_d["default"]
    mean_delta = torch.diag(lambda_b) @ b @ torch.diag(lambda_d[:4]) @ a[:4]
    prop.assert_close(layer.get_delta_weight("default"), mean_delta)
    x = torch.randn(3, 20)
    layer.eval()
    with torch.no_grad():
        prop.assert_close(layer(x), layer.base_layer(x) + x @ mean_delta.T)


def test_sampling_by_hand_with_a_seeded_generator():
    model = mlp_model(target_modules=["lin1"], sample_at_inference=True, generator_seed=3)
    layer = model.base_model.model.lin1
    a = model.base_model.pvera_A["default"][:, :20]
    b = model.base_model.pvera_B["default"][:6, :]
    lambda_b, lambda_d = layer.pvera_lambda_b["default"], layer.pvera_lambda_d["default"]
    x = torch.randn(3, 20)
    hidden = (x @ a.T) * lambda_d
    mu, logvar = hidden[:, :4], hidden[:, 4:]
    noise = torch.randn((3, 4), generator=torch.Generator().manual_seed(3))
    expected = layer.base_layer(x) + ((mu + noise * torch.exp(0.5 * logvar)) @ b.T) * lambda_b
    with torch.no_grad():
        prop.assert_close(layer(x), expected)
        prop.assert_differs(layer(x), expected)  # the stream moves on: a second call draws new noise


def test_sampling_is_reproducible_with_generator_seed_whatever_the_global_rng():
    x = torch.randn(4, 10)
    outputs = []
    for global_seed in (1, 2):
        model = mlp_model(sample_at_inference=True, generator_seed=0)
        torch.manual_seed(global_seed)
        with torch.no_grad():
            outputs.append(model(x))
    prop.assert_close(outputs[0], outputs[1], atol=0)
    assert model.base_model.model.lin0.pvera_generator["default"] is not None
    assert mlp_model().base_model.model.lin0.pvera_generator["default"] is None


def test_generators_are_per_adapter():
    model = mlp_model(target_modules=["lin0"], sample_at_inference=True, generator_seed=0)
    with torch.no_grad():
        model(torch.randn(2, 10))
    state = model.base_model.model.lin0.pvera_generator["default"].get_state()
    model.add_adapter("other", PveraConfig(r=4, target_modules=["lin0"], sample_at_inference=True, generator_seed=0))
    generators = model.base_model.model.lin0.pvera_generator
    assert set(generators) == {"default", "other"}
    assert torch.equal(generators["default"].get_state(), state)
    assert not torch.equal(generators["other"].get_state(), state)
    model.delete_adapter("other")
    assert set(generators) == {"default"} and set(model.base_model.model.lin0.sample_at_inference) == {"default"}


def test_training_samples_and_eval_does_not():
    model = mlp_model()
    x = torch.randn(3, 10)
    model.train()
    with torch.no_grad():
        prop.assert_differs(model(x), model(x))
    model.eval()
    with torch.no_grad():
        prop.assert_close(model(x), model(x), atol=0)


def test_second_adapter_with_larger_rank_is_refused():
    model = mlp_model()
    with pytest.raises(ValueError, match="pvera_A has a size of 8 but 16 or greater"):
        model.add_adapter("big", PveraConfig(r=8, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="PVeRA PRNG initialisation key"):
        model.add_adapter("key", PveraConfig(r=4, target_modules=["lin0"], projection_prng_key=2))
    assert set(model.peft_config) == {"default"}


def test_unsupported_layer_is_a_value_error():
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(MLP(), PveraConfig(r=4, target_modules=["lin0", "emb"]))


def test_quantized_base_matches_the_dequantized_weights():
    config = PveraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(load_in_4bit=True)), config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PveraLayer) and isinstance(layer.get_base_layer(), Linear4bit)
    model.eval()
    x = torch.randn(2, 32)
    dense = layer.get_base_layer().dequantize_weight(torch.float32)
    with torch.no_grad():
        expected = x @ (dense + layer.get_delta_weight("default")).T
        prop.assert_close(layer(x), expected, atol=1e-4)
        model.train()
        loss = model(**lm_inputs()).loss
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------- property suite
@pytest.mark.parametrize("name", CASES)
def test_merge_equals_unmerged(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_unmerge_restores_weights(name):
    prop.check_merge_unmerge_restores_weights(MODEL_FACTORIES[name].make_model, config_for(name))


@pytest.mark.parametrize("name", CASES)
def test_disable_gives_base(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_disable_gives_base(tiny.make_model, tiny.make_inputs(), config_for(name))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_save_load_roundtrip(name, tmp_path):
    tiny = MODEL_FACTORIES[name]
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config_for(name), tmp_path)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_only_adapter_params_train(name):
    tiny = MODEL_FACTORIES[name]
    prop.check_only_adapter_params_train(tiny.make_model, tiny.make_inputs(), config_for(name))


def test_adapters_switch():
    tiny = MODEL_FACTORIES["llama"]
    prop.check_adapters_switch(tiny.make_model, tiny.make_inputs(), config_for("llama"), config_for("llama", d_initial=0.5))


def test_training_lowers_loss():
    tiny = MODEL_FACTORIES["llama"]
    prop.check_training_lowers_loss(tiny.make_model, tiny.make_inputs(), config_for("llama", init_weights=True, r=16),
                                    lr=5e-2)


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_is_noop(name):
    tiny = MODEL_FACTORIES[name]
    prop.fresh_adapter_is_noop(tiny.make_model, tiny.make_inputs(), config_for(name, init_weights=True))
