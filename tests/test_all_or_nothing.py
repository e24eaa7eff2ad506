"""All-or-nothing state changes: a failing load, hot-swap or merge leaves the model exactly as it was,
and damaged values (NaN/inf, integer tensors, NaN weights) are refused before anything changes."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import (
    AdapterStateError,
    CheckpointError,
    ConfigError,
    LoraConfig,
    PeftModel,
    TargetModulesError,
    get_peft_model,
    get_peft_model_state_dict,
)
from peftkit.checkpoint.state_dict import _check_values, set_peft_model_state_dict
from peftkit.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
from peftkit.tuners.lora.layer import LoraLayer
from tests.properties import assert_close, assert_differs, output_of
from tests.tiny_models import VOCAB, llama, lm_inputs

TARGETS = ["q_proj", "v_proj"]
WEIGHTS = "adapter_model.safetensors"


def _lora(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kw})


def _model(seed: int, **kw) -> PeftModel:
    """A tiny LoRA model whose adapter tensors are random per `seed` (llama() itself reseeds to 0)."""
    model = get_peft_model(llama(), _lora(**kw))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _assert_same(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert list(after) == list(before)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert not changed, f"changed by a failed call: {changed}"


def _damage(folder, how: str) -> None:
    """Rewrite the last tensor of a saved adapter: a larger rank, NaN, inf or an integer dtype."""
    weights = load_file(str(folder / WEIGHTS))
    key = sorted(weights)[-1]
    weights[key] = _damaged(weights[key], how)
    save_file(weights, str(folder / WEIGHTS))


def _damaged(value: torch.Tensor, how: str) -> torch.Tensor:
    """`value` made unloadable: a larger rank, NaN, inf, or an integer / bool dtype."""
    return {
        "shape": lambda: torch.zeros(value.shape[0], value.shape[1] * 2),
        "nan": lambda: torch.full_like(value, float("nan")),
        "inf": lambda: torch.full_like(value, float("-inf")),
        "int": lambda: torch.ones_like(value, dtype=torch.int32),
        "bool": lambda: torch.ones_like(value, dtype=torch.bool),
    }[how]()


# ---------------------------------------------------------------------- 1. PiSSA / OLoRA loads that fail
@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
@pytest.mark.parametrize("how", ["shape", "nan"])
def test_failed_pissa_olora_load_restores_the_base_weights(init, how, tmp_path):
    get_peft_model(llama(), _lora(init_lora_weights=init)).save_pretrained(str(tmp_path))
    _damage(tmp_path, how)
    base = llama()
    before, expected = _snapshot(base), output_of(base, lm_inputs())
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(base, str(tmp_path))
    _assert_same(before, base)  # the PiSSA/OLoRA residual W - s B A is gone again
    assert_close(output_of(base, lm_inputs()), expected, atol=0)

    model = get_peft_model(llama(), _lora())
    before, expected = _snapshot(model), output_of(model, lm_inputs())
    with pytest.raises(CheckpointError):
        model.load_adapter(str(tmp_path), "other")
    assert list(model.peft_config) == ["default"]
    _assert_same(before, model)
    assert_close(output_of(model, lm_inputs()), expected, atol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_failed_add_adapter_or_get_peft_model_with_pissa_restores_the_base_weights(init):
    # q_proj is initialised (its base weight rewritten) before input_layernorm is refused.
    bad = _lora(init_lora_weights=init, target_modules=["q_proj", "input_layernorm"])
    model = get_peft_model(llama(), _lora())
    before = _snapshot(model)
    with pytest.raises(TargetModulesError):
        model.add_adapter("other", bad)
    _assert_same(before, model)

    base = llama()
    before = _snapshot(base)
    with pytest.raises(TargetModulesError):
        get_peft_model(base, bad)
    _assert_same(before, base)


def test_a_successful_pissa_load_still_keeps_the_residual(tmp_path):
    """The undo only runs on failure: a good PiSSA adapter loads onto the residual, as peft."""
    torch.manual_seed(0)
    saved = get_peft_model(llama(), _lora(init_lora_weights="pissa"))
    expected = output_of(saved, lm_inputs())
    saved.save_pretrained(str(tmp_path))
    base = llama()
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    loaded = PeftModel.from_pretrained(base, str(tmp_path))
    assert not torch.equal(loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, original)
    assert_close(output_of(loaded, lm_inputs()), expected)


# ---------------------------------------------------------------------- 2. hot-swaps that fail
def _new_state(seed: int, how: str) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    config = _lora()
    state = {k: v.clone() for k, v in get_peft_model_state_dict(_model(seed)).items()}
    key = sorted(state)[-1]  # the last tensor written: every other one would be overwritten before it
    state[key] = _damaged(state[key], how)
    return state, config


@pytest.mark.parametrize("how", ["shape", "nan", "inf", "int", "bool"])
def test_failed_hotswap_from_state_dict_changes_nothing(how):
    model = _model(1)
    before, expected = _snapshot(model), output_of(model, lm_inputs())
    state, config = _new_state(2, how)
    with pytest.raises(CheckpointError, match="Cannot hot-swap .*lora_B"):
        hotswap_adapter_from_state_dict(model, state, "default", config)
    _assert_same(before, model)
    assert_close(output_of(model, lm_inputs()), expected, atol=0)


@pytest.mark.parametrize("how", ["shape", "nan", "int"])
def test_failed_hotswap_from_a_folder_changes_nothing(how, tmp_path):
    _model(2).save_pretrained(str(tmp_path))
    _damage(tmp_path, how)
    model = _model(1)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="Cannot hot-swap"):
        hotswap_adapter(model, str(tmp_path), "default")
    _assert_same(before, model)


def test_hotswap_from_state_dict_takes_file_keys_or_peft_model_keys():
    """peft's `hotswap_adapter_from_state_dict` takes keys with the adapter name; file keys work too."""
    state, config = _new_state(2, "nan")
    source = _model(2)
    expected = output_of(source, lm_inputs())
    file_keys = get_peft_model_state_dict(source)
    in_model = {k: v for k, v in source.state_dict().items() if ".lora_" in k}
    assert set(in_model) != set(file_keys)
    for state in (file_keys, in_model):
        model = _model(1)
        assert_differs(output_of(model, lm_inputs()), expected)
        hotswap_adapter_from_state_dict(model, state, "default", config)
        assert_close(output_of(model, lm_inputs()), expected)


def test_hotswap_of_a_merged_adapter_is_refused():
    model = get_peft_model(llama(), _lora())
    model.merge_adapter()
    state, config = _new_state(2, "nan")
    with pytest.raises(AdapterStateError, match="currently merged"):
        hotswap_adapter_from_state_dict(model, get_peft_model_state_dict(model), "default", config)


# ---------------------------------------------------------------------- 3. merges that fail
def _poison(model: PeftModel, layer_index: int, projection: str) -> None:
    layer = getattr(model.get_base_model().model.layers[layer_index].self_attn, projection)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")


def _assert_wrapped_and_unmerged(model: PeftModel, before: dict[str, torch.Tensor], expected: torch.Tensor) -> None:
    layers = [layer for _, layer in model.base_model.tuner_layers()]
    assert len(layers) == 4 and all(isinstance(layer, LoraLayer) for layer in layers)
    assert not any(layer.merged for layer in layers)
    _assert_same(before, model)
    assert_close(output_of(model, lm_inputs()), expected, atol=0)


def test_failed_safe_merge_and_unload_merges_and_unloads_nothing():
    model = _model(1)
    _poison(model, 0, "q_proj")  # merge_and_unload works inner/last layers first: this one comes last
    before = _snapshot(model)
    with torch.no_grad():
        expected = model(**lm_inputs()).logits  # NaN where the inf reaches: compared with equal_nan below
    with pytest.raises(AdapterStateError, match="nothing was merged"):
        model.merge_and_unload(safe_merge=True)
    layers = [layer for _, layer in model.base_model.tuner_layers()]
    assert len(layers) == 4 and not any(layer.merged for layer in layers)
    _assert_same(before, model)
    with torch.no_grad():
        assert torch.equal(model(**lm_inputs()).logits.isnan(), expected.isnan())


def test_failed_safe_merge_adapter_merges_nothing():
    model = _model(1)
    model.add_adapter("other", _lora())
    _poison(model, 1, "v_proj")  # merge_adapter goes first to last layer: this one comes last
    model.set_adapter("default")
    before = _snapshot(model)
    with pytest.raises(AdapterStateError, match="nothing was merged"):
        model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for _, layer in model.base_model.tuner_layers())
    _assert_same(before, model)


def test_a_merge_failing_while_writing_unmerges_the_layers_it_merged(monkeypatch):
    model = _model(1)
    expected = output_of(model, lm_inputs())
    last = model.get_base_model().model.layers[0].self_attn.q_proj

    def fail(names, safe_merge):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(last, "_merge_names", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        model.merge_and_unload()
    layers = [layer for _, layer in model.base_model.tuner_layers()]
    assert len(layers) == 4 and not any(layer.merged for layer in layers)
    assert_close(output_of(model, lm_inputs()), expected)


def test_safe_merge_still_merges_a_healthy_adapter():
    model = _model(1)
    expected = output_of(model, lm_inputs())
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert_close(output_of(merged, lm_inputs()), expected)


# ---------------------------------------------------------------------- 4. merging LoRA of a tied embedding
def _tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def _merge_warnings(model, call: str) -> list[tuple[type, str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(model, call)()
    return [(w.category, str(w.message)) for w in caught if "tie_word_embeddings" in str(w.message)]


@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter"])
def test_merging_lora_of_a_tied_embedding_warns_as_peft(call):
    import peft

    options = dict(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn at creation already (tested elsewhere)
        ours = get_peft_model(_tied_llama(), LoraConfig(**options))
        theirs = peft.get_peft_model(_tied_llama(), peft.LoraConfig(**options))
    expected = _merge_warnings(theirs, call)
    assert len(expected) == 1
    assert _merge_warnings(ours, call) == expected


def test_merging_an_untied_model_does_not_warn_about_tying():
    model = get_peft_model(llama(), _lora(target_modules=["embed_tokens", "q_proj"]))
    assert _merge_warnings(model, "merge_and_unload") == []


# ---------------------------------------------------------------------- 5. damaged values in weights
@pytest.mark.parametrize("how", ["nan", "inf", "int", "bool"])
def test_non_finite_or_integer_adapter_weights_are_refused_before_loading(how):
    model = _model(1)
    state = {k: v.clone() * 2 for k, v in get_peft_model_state_dict(model).items()}
    key = sorted(state)[-1]
    state[key] = {
        "nan": torch.full_like(state[key], float("nan")),
        "inf": torch.full_like(state[key], float("inf")),
        "int": torch.ones_like(state[key], dtype=torch.int64),
        "bool": torch.ones_like(state[key], dtype=torch.bool),
    }[how]
    before = _snapshot(model)
    message = "NaN/inf" if how in ("nan", "inf") else "wrong dtype"
    with pytest.raises(CheckpointError, match=f"{message}.*{key.replace('.', '[.]')}.*re-save"):
        set_peft_model_state_dict(model, state)
    _assert_same(before, model)  # the other (healthy, changed) tensors were not written either


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_float_weights_still_load(dtype):
    source = _model(1)
    state = {k: v.to(dtype) for k, v in get_peft_model_state_dict(source).items()}
    model = get_peft_model(llama(), _lora())
    set_peft_model_state_dict(model, state)
    for key, value in get_peft_model_state_dict(model).items():
        assert torch.equal(value, state[key].to(value.dtype))


def test_integer_tensors_load_where_the_model_tensor_is_integer():
    _check_values({"k": (torch.ones(2, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8))})  # no error
    with pytest.raises(CheckpointError, match="wrong dtype"):
        _check_values({"k": (torch.ones(2, dtype=torch.int8), torch.zeros(2))})


@pytest.mark.parametrize("how", ["nan", "int"])
def test_damaged_values_in_an_adapter_file_refuse_from_pretrained_and_load_adapter(how, tmp_path):
    get_peft_model(llama(), _lora()).save_pretrained(str(tmp_path))
    _damage(tmp_path, how)
    base = llama()
    before = _snapshot(base)
    with pytest.raises(CheckpointError, match="NaN/inf" if how == "nan" else "wrong dtype"):
        PeftModel.from_pretrained(base, str(tmp_path))
    _assert_same(before, base)
    model = get_peft_model(llama(), _lora())
    with pytest.raises(CheckpointError):
        model.load_adapter(str(tmp_path), "other")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize(
    "adapters, weights, match",
    [
        ([], [], "non-empty list of adapter names"),
        (["default"], [float("nan")], "finite numbers"),
        (["default", "other"], [1.0, float("inf")], "finite numbers"),
        (["default"], [1.0, 0.5], "one weight per adapter"),
        (["default"], 1.0, "list of numbers"),
    ],
)
def test_bad_weighted_adapter_requests_give_config_errors(adapters, weights, match):
    model = get_peft_model(llama(), _lora())
    model.add_adapter("other", _lora())
    with pytest.raises(ConfigError, match=match):
        model.add_weighted_adapter(adapters, weights, "combined", combination_type="linear")
    assert "combined" not in model.peft_config


def test_failed_safe_merge_checks_the_nested_out_proj_of_mha_before_merging_anything() -> None:
    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)  # merged before the attention: it would be merged already
            self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(*[self.lin(x)] * 3)[0]

    torch.manual_seed(0)
    model = get_peft_model(Attention(), LoraConfig(target_modules=["mha", "lin"], init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.lin.lora_B["default"].weight.mul_(1000.0)  # an unmerge would not give W back bit for bit
        model.base_model.model.mha.out_proj_layer.lora_B["default"].weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (model.merge_adapter, model.merge_and_unload):  # the two walk the layers in opposite orders
        with pytest.raises(AdapterStateError, match="NaN"):
            merge(safe_merge=True)
        after = model.state_dict()
        assert sorted(after) == sorted(before)
        assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).all() for k in before)
        assert not any(layer.merged for _, layer in model.base_model.tuner_layers())
        assert not model.base_model.model.mha.out_proj_layer.merged
