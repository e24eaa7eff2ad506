"""LN tuning: config checks, the trained copies, merge as a swap, one adapter at a time, and the
property checks on tiny transformers (with perturbed copies, since a fresh adapter is a no-op)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, LNTuningConfig, PeftConfig, PeftModel, get_peft_model
from peftkit.errors import AdapterStateError
from peftkit.tuners.ln_tuning.layer import LNTuningLayer
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, llama

#: None: peft's per-architecture defaults (the norms); BERT has none there.
TARGETS = {"llama": None, "gpt2": None, "t5": None, "bert": ["LayerNorm"]}


def config_for(name: str, **overrides) -> LNTuningConfig:
    kwargs = {"target_modules": TARGETS[name], "task_type": MODEL_FACTORIES[name].task_type, **overrides}
    return LNTuningConfig(**kwargs)


def perturb(model, adapter_name: str = "default", seed: int = 0):
    """Move every copy of `adapter_name` away from the layer it was copied from (a non-trivial adapter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.base_model.tuner_layers():
            if adapter_name in layer.ln_tuning_layers:
                for param in layer.ln_tuning_layers[adapter_name].parameters():
                    param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(6, 8)
        self.layernorm0 = nn.LayerNorm(8)
        self.lin1 = nn.Linear(8, 8)
        self.layernorm1 = nn.LayerNorm(8)
        self.lin2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.layernorm1(self.lin1(self.layernorm0(self.lin0(x)))))


def inputs_mlp() -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f.default for f in dataclasses.fields(LNTuningConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.LNTuningConfig)}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "peft_type"} == {k: v for k, v in theirs.items() if k != "peft_type"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_modules": [1]}, "Module names must be strings"),
        ({"exclude_modules": 3}, "Module names must be a list of strings or a regex string"),
        ({"modules_to_save": [2]}, r"modules_to_save=\[2\] is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LNTuningConfig(**kwargs)


def test_json_roundtrip_dispatches_to_ln_tuning(tmp_path):
    LNTuningConfig(target_modules=["layernorm0"], exclude_modules="lin.*").save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is LNTuningConfig
    assert (loaded.target_modules, loaded.exclude_modules) == (["layernorm0"], "lin.*")


def test_default_targets_are_the_norms_and_custom_models_need_names():
    model = get_peft_model(llama(), LNTuningConfig())
    names = {name.rpartition(".")[2] for name, _ in model.base_model.tuner_layers()}
    assert names == {"input_layernorm", "post_attention_layernorm", "norm"}
    assert model.get_nb_trainable_parameters()[0] == (2 * 2 + 1) * 32  # RMSNorm weights only
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        get_peft_model(MLP(), LNTuningConfig())


# ---------------------------------------------------------------------------------------------- the layer
def test_copies_train_and_are_saved_under_peft_keys(tmp_path):
    model = get_peft_model(MLP(), LNTuningConfig(target_modules=["layernorm0", "lin1"]))
    layer = model.base_model.model.layernorm0
    assert isinstance(layer, LNTuningLayer) and isinstance(layer.ln_tuning_layers["default"], nn.LayerNorm)
    assert layer.ln_tuning_layers["default"].weight is not layer.base_layer.weight
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"base_model.model.{m}.ln_tuning_layers.default.{p}" for m in ("layernorm0", "lin1")
                         for p in ("bias", "weight")]
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == [f"base_model.model.{m}.ln_tuning_layers.{p}" for m in ("layernorm0", "lin1") for p in ("bias", "weight")]


def test_layers_expose_in_and_out_features_as_peft():
    model = get_peft_model(MLP(), LNTuningConfig(target_modules=["layernorm0", "lin0"]))
    layers = dict(model.base_model.tuner_layers())
    assert (layers["lin0"].in_features, layers["lin0"].out_features) == (6, 8)
    assert (layers["layernorm0"].in_features, layers["layernorm0"].out_features) == (None, None)


def test_forward_uses_the_active_copy_only():
    model = perturb(get_peft_model(MLP(), LNTuningConfig(target_modules=["layernorm0"])))
    layer = model.base_model.model.layernorm0
    hidden = torch.randn(4, 8)
    with torch.no_grad():
        prop.assert_close(layer(hidden), layer.ln_tuning_layers["default"](hidden), atol=0)
        assert not torch.allclose(layer(hidden), layer.base_layer(hidden))
        layer.enable_adapters(False)
        prop.assert_close(layer(hidden), layer.base_layer(hidden), atol=0)


def test_merge_swaps_and_unmerge_swaps_back():
    model = perturb(get_peft_model(MLP(), LNTuningConfig(target_modules=["layernorm0"])))
    layer = model.base_model.model.layernorm0
    original, tuned = layer.base_layer, layer.ln_tuning_layers["default"]
    x = inputs_mlp()
    with torch.no_grad():
        adapted = model(x)
        model.merge_adapter()
        assert layer.base_layer is tuned and layer.ln_tuning_layers["default"] is original
        prop.assert_close(model(x), adapted, atol=0)
        model.unmerge_adapter()
        assert layer.base_layer is original and layer.ln_tuning_layers["default"] is tuned
        with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
            layer.unmerge()
        merged = model.merge_and_unload()
    assert merged.layernorm0 is tuned
    prop.assert_close(merged(x), adapted, atol=0)


def test_disabling_a_merged_layer_unmerges_it():
    model = perturb(get_peft_model(MLP(), LNTuningConfig(target_modules=["layernorm0"])))
    x = inputs_mlp()
    with torch.no_grad():
        base = MLP()(x)
        model.merge_adapter()
        with model.disable_adapter():
            prop.assert_close(model(x), base, atol=0)
    assert not model.base_model.model.layernorm0.merged


def test_one_adapter_at_a_time():
    model = get_peft_model(MLP(), LNTuningConfig(target_modules=["layernorm0"]))
    model.add_adapter("other", LNTuningConfig(target_modules=["layernorm0"]))
    perturb(model, "other", seed=1)
    layer = model.base_model.model.layernorm0
    with pytest.raises(ValueError, match="Trying to merge 2 adapters, but LN tuning does not allow merging more"):
        model.merge_adapter(["default", "other"])
    assert not layer.merged
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="Trying to run forward with 2 active adapters"):
        model(inputs_mlp())
    model.base_model.set_adapter("default")
    model.merge_adapter(["default"])
    with pytest.warns(UserWarning, match=r"Already merged with \{'default'\}. Unmerging first."):
        model.merge_adapter(["other"])
    assert layer.merged_adapters == ["other"] and layer.base_layer is not layer.original_layer()
    torch.testing.assert_close(layer.original_layer().weight, MLP().layernorm0.weight)  # the untouched layer


def test_second_adapter_copies_the_original_even_while_merged():
    model = perturb(get_peft_model(MLP(), LNTuningConfig(target_modules=["layernorm0"])))
    model.merge_adapter()
    model.add_adapter("other", LNTuningConfig(target_modules=["layernorm0"]))
    layer = model.base_model.model.layernorm0
    torch.testing.assert_close(layer.ln_tuning_layers["other"].weight, MLP().layernorm0.weight)


def test_unloading_several_adapters_with_modules_to_save_is_refused():
    model = get_peft_model(MLP(), LNTuningConfig(target_modules=["layernorm0"], modules_to_save=["lin2"]))
    model.add_adapter("other", LNTuningConfig(target_modules=["layernorm1"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(AdapterStateError, match="Cannot unload multiple adapters that specify `modules_to_save`."):
        model.merge_and_unload()


def test_half_precision_copies_keep_the_layer_dtype():
    model = get_peft_model(llama().to(torch.bfloat16), LNTuningConfig())
    layer = model.base_model.model.model.norm
    assert layer.ln_tuning_layers["default"].weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


def test_fresh_adapter_is_noop(case):
    name, tiny = case
    prop.fresh_adapter_is_noop(tiny.make_model, tiny.make_inputs(), config_for(name))


def test_merge_equals_unmerged(case):
    name, tiny = case
    inputs = tiny.make_inputs()
    model = perturb(get_peft_model(tiny.make_model(), config_for(name)))
    unmerged = prop.output_of(model, inputs)
    prop.assert_differs(unmerged, prop.output_of(tiny.make_model(), inputs))
    model.merge_adapter()
    prop.assert_close(prop.output_of(model, inputs), unmerged)
    model.unmerge_adapter()
    prop.assert_close(prop.output_of(model, inputs), unmerged)
    prop.assert_close(prop.output_of(model.merge_and_unload(), inputs), unmerged)


def test_disable_gives_base(case):
    name, tiny = case
    inputs = tiny.make_inputs()
    base = prop.output_of(tiny.make_model(), inputs)
    model = perturb(get_peft_model(tiny.make_model(), config_for(name)))
    adapted = prop.output_of(model, inputs)
    prop.assert_differs(adapted, base)
    with model.disable_adapter():
        prop.assert_close(prop.output_of(model, inputs), base)
    prop.assert_close(prop.output_of(model, inputs), adapted)


def test_save_load_roundtrip(case, tmp_path):
    name, tiny = case
    inputs = tiny.make_inputs()
    model = perturb(get_peft_model(tiny.make_model(), config_for(name)))
    expected = prop.output_of(model, inputs)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny.make_model(), str(tmp_path))
    prop.assert_close(prop.output_of(loaded, inputs), expected, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny.make_model(), str(tmp_path), is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_only_adapter_params_train(case):
    name, tiny = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prop.check_only_adapter_params_train(tiny.make_model, tiny.make_inputs(), config_for(name))


def test_adapters_switch(case):
    name, tiny = case
    inputs = tiny.make_inputs()
    model = perturb(get_peft_model(tiny.make_model(), config_for(name)))
    model.add_adapter("other", config_for(name))
    perturb(model, "other", seed=1)
    first = prop.output_of(model, inputs)
    model.set_adapter("other")
    second = prop.output_of(model, inputs)
    prop.assert_differs(first, second)
    assert all(".default" not in n for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("other")
    assert model.active_adapter == "default"
    prop.assert_close(prop.output_of(model, inputs), first)


def test_training_lowers_loss(case):
    name, tiny = case
    prop.check_training_lowers_loss(tiny.make_model, tiny.make_inputs(), config_for(name), lr=5e-2)
