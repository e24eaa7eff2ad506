"""Behaviour that follows peft 0.21.2 where code written for peft relies on it (issue 18).

Each test pins one rule, message or warning of peft's: merge_and_unload / unload, merge warnings,
`from_pretrained(config=...)`, `disable_adapter()`, `set_adapter(inference_mode=...)`, the wording of
unknown-adapter errors, learnable biases under FSDP, ParameterDict adapters under FSDP, and several
active adapters over modules_to_save copies.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from peftkit import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.tuners._core.layer import BaseTunerLayer
from tests.tiny_models import llama


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(X)))))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


INPUTS = torch.arange(90, dtype=torch.float32).view(9, 10) / 90


CONFIGS = {
    "lora": lambda: LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=[], init_ia3_weights=False),
    "loha": lambda: LoHaConfig(target_modules=["lin0", "lin1"], init_weights=False),
    "lokr": lambda: LoKrConfig(target_modules=["lin0", "lin1"], init_weights=False),
}


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def trainable(model: nn.Module) -> list[str]:
    return sorted(name for name, param in model.named_parameters() if param.requires_grad)


# ---------------------------------------------------------------------------------------------- unloading
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_unloaded_model_has_no_peft_config(method, how):
    model = get_peft_model(mlp(), CONFIGS[method]())
    assert hasattr(model.get_base_model(), "peft_config")
    base = getattr(model, how)()
    assert not tuner_layers(base)
    assert not hasattr(base, "peft_config")
    # The plain model can be wrapped again without complaints about a leftover config.
    get_peft_model(base, CONFIGS[method]())


# ---------------------------------------------------------------------------------------------- merge warnings
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merging_twice_warns_as_peft(method):
    model = get_peft_model(mlp(), CONFIGS[method]()).eval()
    model.merge_adapter()
    merged = model(INPUTS)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    torch.testing.assert_close(model(INPUTS), merged)


def test_merging_an_additional_adapter_names_the_merged_ones():
    model = get_peft_model(mlp(), CONFIGS["lora"]())
    model.add_adapter("other", CONFIGS["lora"]())
    model.merge_adapter(["default"])
    with pytest.warns(UserWarning, match="Already following adapters were merged default. You are now additionally merging other"):
        model.merge_adapter(["other"])
    assert tuner_layers(model)[0].merged_adapters == ["default", "other"]


def test_merge_adapter_names_must_be_a_list():
    model = get_peft_model(mlp(), CONFIGS["lora"]())
    with pytest.raises(TypeError, match="adapter_names should be a list of strings"):
        tuner_layers(model)[0].merge(adapter_names="default")


def test_safe_merge_of_a_broken_adapter_uses_peft_wording():
    model = get_peft_model(mlp(), CONFIGS["lora"]())
    with torch.no_grad():
        tuner_layers(model)[0].lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_and_unload(safe_merge=True)


def test_switching_adapters_on_a_merged_model_warns_as_peft():
    model = get_peft_model(mlp(), CONFIGS["lora"]())
    model.add_adapter("other", CONFIGS["lora"]())
    model.merge_adapter()
    with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model first."):
        model.set_adapter("other")
    assert not any(layer.merged for layer in tuner_layers(model))


# ---------------------------------------------------------------------------------------------- from_pretrained
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_keeps_the_given_config(tmp_path, method, is_trainable):
    get_peft_model(mlp(), CONFIGS[method]()).save_pretrained(str(tmp_path))
    config = CONFIGS[method]()
    loaded = PeftModel.from_pretrained(mlp(), str(tmp_path), config=config, is_trainable=is_trainable)
    assert loaded.peft_config["default"] is config
    assert config.inference_mode is not is_trainable
    assert bool(trainable(loaded)) is is_trainable
    reference = PeftModel.from_pretrained(mlp(), str(tmp_path))
    torch.testing.assert_close(loaded(INPUTS), reference(INPUTS))


def test_from_pretrained_refuses_a_config_that_is_not_a_peft_config(tmp_path):
    get_peft_model(mlp(), CONFIGS["lora"]()).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="The input config must be a PeftConfig"):
        PeftModel.from_pretrained(mlp(), str(tmp_path), config={"r": 8})


# ---------------------------------------------------------------------------------------------- disable_adapter
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_leaving_disable_adapter_restores_each_layers_state(method):
    model = get_peft_model(mlp(), CONFIGS[method]())
    layers = tuner_layers(model)
    with model.disable_adapter():
        assert all(layer.disable_adapters for layer in layers)
    assert not any(layer.disable_adapters for layer in layers)

    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(layer.disable_adapters for layer in layers), "layers disabled before stay disabled"
    assert not trainable(model)


def test_disable_adapter_with_some_layers_disabled_warns_and_enables_all():
    model = get_peft_model(mlp(), CONFIGS["lora"]())
    layers = tuner_layers(model)
    layers[0].enable_adapters(False)
    with pytest.warns(UserWarning, match="The model contains some adapter layers that are enabled and others that are disabled"):
        with model.disable_adapter():
            pass
    assert not any(layer.disable_adapters for layer in layers)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_disable_adapter_with_trained_biases_warns(bias):
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], bias=bias))
    with pytest.warns(UserWarning, match=f"Careful, disabling adapter layers with bias configured to be '{bias}'"):
        with model.disable_adapter():
            pass


def test_disable_adapter_without_biases_does_not_warn():
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.disable_adapter():
            pass


# ---------------------------------------------------------------------------------------------- set_adapter
def test_set_adapter_inference_mode_freezes_the_activated_adapter():
    config = LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"])
    model = get_peft_model(mlp(), config)
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))

    model.set_adapter("other", inference_mode=False)
    assert trainable(model) == [
        "base_model.model.lin0.lora_A.other.weight",
        "base_model.model.lin0.lora_B.other.weight",
        "base_model.model.lin2.modules_to_save.other.bias",
        "base_model.model.lin2.modules_to_save.other.weight",
    ]
    model.set_adapter("default", inference_mode=True)
    assert model.active_adapter == "default" and not trainable(model)
    with model.disable_adapter():
        pass
    assert not trainable(model), "inference_mode=True holds until the next set_adapter"
    model.base_model.set_adapter("default")  # the tuner takes the same argument
    assert len(trainable(model)) == 4


# ---------------------------------------------------------------------------------------------- error wording
def test_unknown_adapter_errors_use_peft_wording():
    model = get_peft_model(mlp(), CONFIGS["lora"]())
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")
    with pytest.raises(ValueError, match="Adapter nope not found"):
        model.set_adapter("nope")


# ---------------------------------------------------------------------------------------------- FSDP-wrapped models
@pytest.fixture(scope="module")
def process_group():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FSDP(model, use_orig_params=True, device_id="cpu")


@pytest.mark.parametrize("receiving_bias", ["same", "none"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_learnable_bias_roundtrip_from_an_fsdp_wrapped_model(process_group, bias, receiving_bias):
    """The biases saved from an FSDP-wrapped model load back, also into a model whose config trains
    none (peft loads every key that names a model tensor)."""
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], init_lora_weights=False, bias=bias)).eval()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None and (bias == "all" or isinstance(module, BaseTunerLayer)):
                module.bias.fill_(1.23)
    wrapped = _fsdp(model)
    with torch.no_grad():
        before = wrapped(INPUTS)
    state = get_peft_model_state_dict(wrapped)
    assert "base_model.model.lin0.base_layer.bias" in state
    assert ("base_model.model.lin2.bias" in state) is (bias == "all")

    fresh_bias = bias if receiving_bias == "same" else "none"
    fresh = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], bias=fresh_bias)).eval()
    result = set_peft_model_state_dict(fresh, state)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(INPUTS), before)


@pytest.mark.parametrize("method", ["loha", "lokr", "ia3"])
def test_parameter_dict_adapters_run_and_save_under_fsdp(process_group, method):
    """Under FSDP (use_orig_params) a ParameterDict holds plain tensors during forward."""
    model = get_peft_model(mlp(), CONFIGS[method]()).eval()
    wrapped = _fsdp(model)
    with torch.no_grad():
        before = wrapped(INPUTS)
    state = get_peft_model_state_dict(wrapped)
    fresh = get_peft_model(mlp(), CONFIGS[method]()).eval()
    set_peft_model_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(INPUTS), before)


def test_adalora_accepts_peft_adalora_only_bias():
    """peft treats any bias="<method>_only" as the biases of the wrapped layers; suites set "adalora_only"."""
    from peftkit import AdaLoraConfig

    config = AdaLoraConfig(target_modules=["lin0"], total_step=1, bias="adalora_only")
    model = get_peft_model(mlp(), config)
    assert "base_model.model.lin0.base_layer.bias" in trainable(model)
    assert "base_model.model.lin0.base_layer.bias" in get_peft_model_state_dict(model)


# ---------------------------------------------------------------------------------------------- modules_to_save
class DeepMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MLP() for _ in range(3)])

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return sum(layer(X) for layer in self.layers)


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "lokr"])
def test_several_active_adapters_may_not_share_a_modules_to_save_copy(method):
    def config(modules):
        extra = {"feedforward_modules": []} if method == "ia3" else {}
        return type(CONFIGS[method]())(target_modules=["layers.0.lin0"], modules_to_save=modules, **extra)

    torch.manual_seed(0)
    model = get_peft_model(DeepMLP(), config(["layers.0.lin1", "layers.1.lin1"]))
    model.add_adapter("other", config(["layers.2.lin1", "layers.1.lin1"]))
    before = trainable(model)
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"] and trainable(model) == before, "refused before changing anything"

    torch.manual_seed(0)
    model = get_peft_model(DeepMLP(), config(["layers.0.lin1"]))
    model.add_adapter("other", config(["layers.1.lin1"]))
    model.base_model.set_adapter(["default", "other"])
    inner = model.base_model.model
    assert inner.layers[0].lin1.active_adapters == ["default"]
    assert inner.layers[1].lin1.active_adapters == ["other"]
    assert "base_model.model.layers.1.lin1.modules_to_save.other.weight" in trainable(model)


def test_modules_to_save_of_an_inactive_adapter_is_not_active():
    """A copy that only an inactive adapter has: the wrapper's active adapters are [] (the original runs)."""
    torch.manual_seed(0)
    model = get_peft_model(DeepMLP(), LoraConfig(target_modules=["layers.0.lin0"]))
    model.add_adapter("other", LoraConfig(target_modules=["layers.0.lin0"], modules_to_save=["layers.0.lin1"]))
    wrapper = model.base_model.model.layers[0].lin1
    assert wrapper.active_adapters == [] and not wrapper.modules_to_save["other"].weight.requires_grad
    model.set_adapter("other")
    assert wrapper.active_adapters == ["other"] and wrapper.modules_to_save["other"].weight.requires_grad
    model.set_adapter("default")
    assert wrapper.active_adapters == [] and not wrapper.modules_to_save["other"].weight.requires_grad
    assert model.merge_and_unload().layers[0].lin1 is wrapper.original_module


# ---------------------------------------------------------------------------------------------- deleting merged adapters
def test_deleting_a_merged_adapter_is_refused_and_deleting_another_keeps_the_merge():
    """As peft: a merged adapter cannot be deleted (nothing changes); deleting an unmerged one keeps the merge."""
    config = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(llama(), config, adapter_name="adapter0")
    model.add_adapter("adapter1", config)
    model.set_adapter("adapter1")
    model.merge_adapter()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    merged = [list(layer.merged_adapters) for layer in layers]
    available = [set(layer._all_available_adapter_names()) for layer in layers]
    assert all(names == {"adapter0", "adapter1"} for names in available)
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['adapter1'\] while they are merged"):
        model.delete_adapter("adapter1")
    assert set(model.peft_config) == {"adapter0", "adapter1"}
    assert [list(layer.merged_adapters) for layer in layers] == merged
    assert [set(layer._all_available_adapter_names()) for layer in layers] == available
    model.delete_adapter("adapter0")
    assert set(model.peft_config) == {"adapter1"}
    assert [list(layer.merged_adapters) for layer in layers] == merged  # still merged
    model.unmerge_adapter()
    model.delete_adapter("adapter1")
    assert not model.peft_config


# ---------------------------------------------------------------------------------------------- peft's phrases
def test_errors_and_warnings_carry_peft_phrases():
    """Code written for peft matches on these texts and classes."""
    from peftkit import PeftWarning

    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    inputs = {"input_ids": torch.tensor([[3, 4, 5], [6, 7, 8]])}
    with pytest.raises(ValueError, match=r"Length of `adapter_names` should be the same as the number of inputs, but got 3 and 2"):
        model(**inputs, adapter_names=["default"] * 3)
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): nope"):
        model(**inputs, adapter_names=["default", "nope"])
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"Cannot pass `adapter_names` when there are merged adapters"):
        model(**inputs, adapter_names=["default", "default"])
    model.unmerge_adapter()
    with pytest.raises(ValueError, match=r"Adapter with name 'default' already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))
    dora = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"Cannot pass `adapter_names` when DoRA is enabled"):
        dora(**inputs, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match=r"Please specify `target_modules` in `peft_config`"):
        get_peft_model(MLP(), LoraConfig())
    with pytest.warns(PeftWarning, match="has no bias"):
        get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], lora_bias=True))


def test_size_mismatch_is_a_runtime_error_and_can_be_ignored(tmp_path):
    """As peft (torch's "size mismatch"): a resized embedding refuses the adapter, unless ignore_mismatched_sizes."""
    from torch import nn

    def model(rows: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(rows, 8), nn.Linear(8, 4))

    peft_model = get_peft_model(model(10), LoraConfig(target_modules=["0", "1"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"size mismatch.*\(8, 10\).*\(8, 12\)"):
        PeftModel.from_pretrained(model(12), tmp_path)
    loaded = PeftModel.from_pretrained(model(12), tmp_path, ignore_mismatched_sizes=True)
    linear = loaded.base_model.model[1]
    assert torch.equal(linear.lora_A["default"].weight, peft_model.base_model.model[1].lora_A["default"].weight)


def test_mixed_batch_over_a_module_copy_that_cannot_split_rows_is_a_type_error():
    from torch import nn

    class WithGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0 = nn.Linear(4, 4)
            self.gru = nn.GRU(4, 4, batch_first=True)

        def forward(self, x):
            return self.gru(self.lin0(x))[0]

    model = get_peft_model(WithGRU().eval(), LoraConfig(target_modules=["lin0"], modules_to_save=["gru"]), "a").eval()
    model.add_adapter("b", LoraConfig(target_modules=["lin0"], modules_to_save=["gru"]))
    with pytest.raises(TypeError, match="Mixed batching is only supported for the following modules: Linear"):
        model(torch.randn(2, 3, 4), adapter_names=["a", "b"])


def test_model_type_is_read_like_peft_from_config_to_dict():
    from unittest.mock import MagicMock

    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4))
    model.config = MagicMock()
    model.config.to_dict.return_value = {"model_type": "foobar"}
    with pytest.raises(ValueError, match="Please specify `target_modules`.*'foobar'"):
        get_peft_model(model, LoraConfig())


def test_lora_conv_layers_print_as_peft_names_them():
    from torch import nn

    model = get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3)), LoraConfig(target_modules=["0"]))
    assert repr(model.base_model.model[0]).startswith("lora.Conv2d(")
