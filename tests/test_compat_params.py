"""peft's compatibility parameters do what peft does (or are refused), and the adapter folder has one owner.

- `low_cpu_mem_usage=True`: adapter tensors are created on the meta device and assigned when the
  weights are loaded (outputs equal a normal load, exactly);
- `autocast_adapter_dtype`: fp32 adapters over fp16/bf16 bases (True) or the base dtype (False);
- `torch_device` of `load_adapter`: where the checkpoint is read to; a device this machine lacks is refused;
- `inject_adapter_in_model(state_dict=...)`: targets come from the state dict's keys;
- `checkpoint.adapter_folder`: the one writer of `adapter_config.json` text, one location per load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open

import peftkit.checkpoint.adapter_folder as adapter_folder
import peftkit.peft_model as peft_model_module
from peftkit import (
    AdaLoraConfig,
    BottleneckConfig,
    ConfigError,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PromptTuningConfig,
    TargetModulesError,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peftkit.checkpoint.adapter_folder import adapter_config_to_save, config_text
from peftkit.tuners.lora import LoraModel
from peftkit.tuners.lora.layer import Linear as LoraLinear
from peftkit.tuners.lora.layer import LoraLayer
from tests.properties import assert_differs, output_of
from tests.tiny_models import bert_seq_cls, cls_inputs, llama, lm_inputs

LOADABLE = {
    "lora": lambda: LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora_embedding": lambda: LoraConfig(target_modules=["q_proj", "embed_tokens"], init_lora_weights=False),
    "lora_bias": lambda: LoraConfig(target_modules=["q_proj"], init_lora_weights=False, bias="lora_only"),
    "pissa": lambda: LoraConfig(target_modules=["q_proj", "v_proj"], r=2, init_lora_weights="pissa"),
    "ia3": lambda: IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
    "loha": lambda: LoHaConfig(target_modules=["q_proj", "v_proj"], init_weights=False),
    "lokr": lambda: LoKrConfig(target_modules=["q_proj", "v_proj"], init_weights=False),
    "bottleneck": lambda: BottleneckConfig(adapter_dim=4, init_weights=False, task_type="CAUSAL_LM"),
    # DoRA's magnitude is created empty on meta; AdaLoRA's ranknum (never saved) is made real at once.
    "dora": lambda: LoraConfig(target_modules=["q_proj"], use_dora=True, init_lora_weights=False),
    "adalora": lambda: AdaLoraConfig(target_modules=["q_proj"], total_step=5, init_lora_weights=False),
}


def _trained(config) -> PeftModel:
    """A model whose adapter differs from any init (so a load that is skipped shows)."""
    model = get_peft_model(llama(), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model


def _adapter_params(model: torch.nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    return {key: p for key, p in model.named_parameters() if f".{name}." in f".{key}." or key.endswith(f".{name}")}


def _structure(model: torch.nn.Module) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model.named_modules()]


# ---------------------------------------------------------------------------------------------- low_cpu_mem_usage
@pytest.fixture
def meta_at_load(monkeypatch):
    """Records, at each weight load of the loaders, whether every tensor of the new adapter was on meta."""
    seen: list[bool] = []
    original = peft_model_module.set_peft_model_state_dict

    def spy(model, state, adapter_name="default", **kwargs):
        params = _adapter_params(model, adapter_name)
        # (AdaLoRA's ranknum is real from the start: checkpoints never hold it.)
        loaded = {key: p for key, p in params.items() if "modules_to_save" not in key and ".ranknum." not in key}
        seen.append(bool(loaded) and all(p.is_meta for p in loaded.values()))
        return original(model, state, adapter_name=adapter_name, **kwargs)

    monkeypatch.setattr(peft_model_module, "set_peft_model_state_dict", spy)
    return seen


@pytest.mark.parametrize("method", sorted(LOADABLE))
def test_low_cpu_mem_usage_from_pretrained_equals_a_normal_load(tmp_path, method, meta_at_load):
    trained = _trained(LOADABLE[method]())
    trained.save_pretrained(str(tmp_path))
    normal = PeftModel.from_pretrained(llama(), str(tmp_path))
    assert meta_at_load == [False]
    fast = PeftModel.from_pretrained(llama(), str(tmp_path), low_cpu_mem_usage=True)
    assert meta_at_load == [False, True]  # created on meta, filled by the load
    assert not [key for key, p in fast.named_parameters() if p.is_meta]
    assert torch.equal(output_of(fast, lm_inputs()), output_of(normal, lm_inputs()))
    assert torch.equal(output_of(fast, lm_inputs()), output_of(trained, lm_inputs()))
    assert_differs(output_of(fast, lm_inputs()), output_of(llama(), lm_inputs()))
    expected = {k: (p.dtype, p.device, p.requires_grad) for k, p in normal.named_parameters()}
    assert {k: (p.dtype, p.device, p.requires_grad) for k, p in fast.named_parameters()} == expected


def test_low_cpu_mem_usage_load_adapter_trainable_and_with_a_head(tmp_path, meta_at_load):
    trained = get_peft_model(bert_seq_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"], init_lora_weights=False))
    trained.save_pretrained(str(tmp_path))
    model = get_peft_model(bert_seq_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["value"]))
    model.load_adapter(str(tmp_path), adapter_name="other", is_trainable=True, low_cpu_mem_usage=True)
    assert meta_at_load == [True]
    model.set_adapter("other")
    assert torch.equal(output_of(model, cls_inputs()), output_of(trained, cls_inputs()))
    trainable = sorted(k.replace(".other.", ".default.") for k, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(k for k, p in trained.named_parameters() if p.requires_grad)


def test_inject_on_meta_then_set_state_dict(tmp_path):
    """The diffusers flow: inject empty adapters, then load a state dict into them."""
    trained = _trained(LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    state = get_peft_model_state_dict(trained)
    model = inject_adapter_in_model(LoraConfig(target_modules=["q_proj", "v_proj"]), llama(), low_cpu_mem_usage=True)
    lora_params = [p for key, p in model.named_parameters() if "lora_" in key]
    assert lora_params and all(p.is_meta for p in lora_params)
    assert not any(p.is_meta for key, p in model.named_parameters() if "lora_" not in key)  # base weights untouched
    result = set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(output_of(model, lm_inputs()), output_of(trained, lm_inputs()))


def test_get_peft_model_low_cpu_mem_usage_keeps_meta_and_warns():
    with pytest.warns(UserWarning, match="meta device until set_peft_model_state_dict"):
        model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"]), low_cpu_mem_usage=True)
    assert all(p.is_meta for key, p in model.named_parameters() if "lora_" in key)
    prompt = get_peft_model(llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in prompt.parameters())  # prompt learning ignores it, as in peft


class _ValueAtCreation(LoraLayer):
    """A third-party LoRA variant that computes with its new weights while it creates them."""

    def update_layer(self, adapter_name, **kwargs):
        super().update_layer(adapter_name, **kwargs)
        self.norm = (self.get_base_layer().weight + self.get_delta_weight(adapter_name)).norm()  # cpu + meta: fails


class _UnsavedTensor(LoraLayer):
    """A third-party LoRA variant holding a tensor that checkpoints do not (a ParameterDict outside adapter_layer_names)."""

    other_param_names = (*LoraLayer.other_param_names, "extra")

    def update_layer(self, adapter_name, **kwargs):
        self.extra = getattr(self, "extra", None) or torch.nn.ParameterDict()
        self.extra[adapter_name] = torch.nn.Parameter(torch.ones(1), requires_grad=False)
        super().update_layer(adapter_name, **kwargs)


@pytest.mark.parametrize(
    "layer_cls, message",
    [(_ValueAtCreation, "cannot be created on the meta device"), (_UnsavedTensor, "checkpoints do not hold.*extra")],
    ids=["computes-at-creation", "unsaved-tensor"],
)
def test_low_cpu_mem_usage_refused_where_meta_cannot_work(tmp_path, monkeypatch, layer_cls, message):
    get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(str(tmp_path))

    def dispatch(target, adapter_name, **kwargs):
        return type("Variant", (layer_cls, LoraLinear), {})(target, adapter_name, **kwargs) if isinstance(target, torch.nn.Linear) else None

    monkeypatch.setattr(LoraModel, "dispatchers", (dispatch,))
    base = llama()
    before = _structure(base)
    with pytest.raises(ConfigError, match=message):
        PeftModel.from_pretrained(base, str(tmp_path), low_cpu_mem_usage=True)
    assert _structure(base) == before
    assert not any(p.is_meta for p in base.parameters())
    loaded = PeftModel.from_pretrained(base, str(tmp_path))  # without the flag it loads
    assert not any(p.is_meta for p in loaded.parameters())


# ---------------------------------------------------------------------------------------------- autocast_adapter_dtype
DTYPE_METHODS = {
    "lora": lambda: LoraConfig(target_modules=["q_proj"]),
    "dora": lambda: LoraConfig(target_modules=["q_proj"], use_dora=True),
    "ia3": lambda: IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
    "loha": lambda: LoHaConfig(target_modules=["q_proj"]),
    "lokr": lambda: LoKrConfig(target_modules=["q_proj"]),
    "adalora": lambda: AdaLoraConfig(target_modules=["q_proj"], total_step=5),
    "bottleneck": lambda: BottleneckConfig(adapter_dim=4, task_type="CAUSAL_LM"),
}


def _adapter_dtypes(model: torch.nn.Module, name: str = "default") -> set[torch.dtype]:
    return {p.dtype for p in _adapter_params(model, name).values()}


@pytest.mark.parametrize("method", sorted(DTYPE_METHODS))
def test_autocast_adapter_dtype_on_a_bf16_base(method):
    config = DTYPE_METHODS[method]
    cast = get_peft_model(llama().to(torch.bfloat16), config())
    kept = get_peft_model(llama().to(torch.bfloat16), config(), autocast_adapter_dtype=False)
    assert _adapter_dtypes(cast) == {torch.float32}
    assert _adapter_dtypes(kept) == {torch.bfloat16}
    assert output_of(kept, lm_inputs()).dtype == torch.bfloat16
    fp32 = get_peft_model(llama(), config(), autocast_adapter_dtype=False)
    assert _adapter_dtypes(fp32) == {torch.float32}  # an fp32 base keeps fp32 either way
    frozen = dataclasses.replace(config(), inference_mode=True)  # AdaLoRA trains one adapter at a time
    kept.add_adapter("other", frozen, autocast_adapter_dtype=False)
    kept.add_adapter("third", frozen)
    assert _adapter_dtypes(kept, "other") == {torch.bfloat16} and _adapter_dtypes(kept, "third") == {torch.float32}


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_autocast_adapter_dtype_when_loading(tmp_path, low_cpu_mem_usage):
    _trained(LoraConfig(target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(str(tmp_path))
    flags = {"low_cpu_mem_usage": low_cpu_mem_usage}
    cast = PeftModel.from_pretrained(llama().to(torch.bfloat16), str(tmp_path), **flags)
    kept = PeftModel.from_pretrained(llama().to(torch.bfloat16), str(tmp_path), autocast_adapter_dtype=False, **flags)
    assert _adapter_dtypes(cast) == {torch.float32} and _adapter_dtypes(kept) == {torch.bfloat16}
    kept.load_adapter(str(tmp_path), adapter_name="fp32", **flags)
    kept.load_adapter(str(tmp_path), adapter_name="bf16", autocast_adapter_dtype=False, **flags)
    assert _adapter_dtypes(kept, "fp32") == {torch.float32} and _adapter_dtypes(kept, "bf16") == {torch.bfloat16}
    weights = adapter_folder.read_adapter_weights(str(tmp_path))
    key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    live = kept.base_model.model.model.layers[0].self_attn.q_proj.lora_A["bf16"].weight
    assert torch.equal(live, weights[key].to(torch.bfloat16)), key


def test_autocast_adapter_dtype_on_a_quantized_base():
    from peftkit.quantization import QuantizationConfig, quantize_model

    def quantized():
        return quantize_model(llama(), QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))

    config = LoraConfig(target_modules=["q_proj"])
    assert _adapter_dtypes(get_peft_model(quantized(), config)) == {torch.float32}
    assert _adapter_dtypes(get_peft_model(quantized(), config, autocast_adapter_dtype=False)) == {torch.bfloat16}


def test_autocast_adapter_dtype_false_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    source = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    source.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(llama().to(torch.bfloat16), str(tmp_path), autocast_adapter_dtype=False)
    ours = PeftModel.from_pretrained(llama().to(torch.bfloat16), str(tmp_path), autocast_adapter_dtype=False)
    assert _adapter_dtypes(ours) == _adapter_dtypes(theirs) == {torch.bfloat16}
    our_state, their_state = get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert our_state.keys() == their_state.keys()
    assert all(torch.equal(our_state[key], their_state[key]) for key in our_state)
    # bf16 arithmetic: the two forwards round differently, far below what the adapter changes.
    base = output_of(llama().to(torch.bfloat16), lm_inputs()).float()
    mine, reference = output_of(ours, lm_inputs()).float(), output_of(theirs, lm_inputs()).float()
    assert (mine - reference).abs().max() < 0.1 * (reference - base).abs().max()


# ---------------------------------------------------------------------------------------------- torch_device
def test_torch_device_of_load_adapter(tmp_path, monkeypatch):
    trained = _trained(LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    trained.save_pretrained(str(tmp_path))
    model = get_peft_model(llama(), LoraConfig(target_modules=["v_proj"]))
    devices = []
    original = adapter_folder.read_weights_file
    monkeypatch.setattr(adapter_folder, "read_weights_file", lambda path, device: devices.append(device) or original(path, device))
    model.load_adapter(str(tmp_path), adapter_name="on_cpu", torch_device="cpu")
    assert devices == ["cpu"]
    model.set_adapter("on_cpu")
    assert torch.equal(output_of(model, lm_inputs()), output_of(trained, lm_inputs()))
    before = _structure(model)
    bad = ["nope", "meta"] + ([] if torch.cuda.is_available() else ["cuda:0"])
    for device in bad:
        with pytest.raises(ConfigError, match=f"torch_device='{device}' cannot hold the adapter weights here"):
            model.load_adapter(str(tmp_path), adapter_name="bad", torch_device=device)
        assert _structure(model) == before and "bad" not in model.peft_config


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_device_cuda_reads_onto_the_gpu_and_the_adapter_follows_its_base(tmp_path):
    trained = _trained(LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    trained.save_pretrained(str(tmp_path))
    model = get_peft_model(llama(), LoraConfig(target_modules=["v_proj"]))
    model.load_adapter(str(tmp_path), adapter_name="gpu", torch_device="cuda")
    assert {p.device.type for p in _adapter_params(model, "gpu").values()} == {"cpu"}  # the base's device, as peft
    model.set_adapter("gpu")
    assert torch.equal(output_of(model, lm_inputs()), output_of(trained, lm_inputs()))


# ---------------------------------------------------------------------------------------------- inject(state_dict=)
def _lora_modules(model: torch.nn.Module) -> list[str]:
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer"))


def test_inject_with_a_state_dict_targets_exactly_its_modules():
    source = inject_adapter_in_model(LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]), llama())
    state = get_peft_model_state_dict(source)
    wanted = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert _lora_modules(source) == wanted
    with pytest.warns(RuntimeWarning, match=r"only in target_modules: \[.*k_proj.*\]; only in the state_dict: \[.*q_proj"):
        model = inject_adapter_in_model(LoraConfig(target_modules=["k_proj"]), llama(), state_dict=state)
    assert _lora_modules(model) == wanted
    assert set(get_peft_model_state_dict(model)) == set(state)
    agreeing, base = LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]), llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # config and state dict agree: no warning
        assert _lora_modules(inject_adapter_in_model(agreeing, base, state_dict=state)) == wanted
    # Keys as a PeftModel's file or a live state dict holds them (prefix, adapter name) name the same modules.
    prefixed = {"base_model.model." + key: value for key, value in state.items()}
    live = {key: value for key, value in model.state_dict().items() if "lora_" in key}
    for keys in (prefixed, live):
        with pytest.warns(RuntimeWarning):
            assert _lora_modules(inject_adapter_in_model(LoraConfig(target_modules=["k_proj"]), llama(), state_dict=keys)) == wanted


def test_inject_with_a_state_dict_naming_no_module():
    with pytest.raises(TargetModulesError, match="names no module of LlamaForCausalLM.*'<module path>.lora_...'"):
        inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), llama(), state_dict={"nothing.lora_A.weight": torch.zeros(1)})


def test_inject_with_a_state_dict_on_meta_loads_exactly():
    trained = _trained(LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], init_lora_weights=False))
    state = get_peft_model_state_dict(trained)
    with pytest.warns(RuntimeWarning):
        model = inject_adapter_in_model(LoraConfig(target_modules=["v_proj"]), llama(), low_cpu_mem_usage=True, state_dict=state)
    set_peft_model_state_dict(model, state)  # meta tensors are assigned whatever the flag
    assert torch.equal(output_of(model, lm_inputs()), output_of(trained, lm_inputs()))


# ---------------------------------------------------------------------------------------------- the adapter folder
def test_one_writer_of_adapter_config_text(tmp_path):
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "model"))
    text = (tmp_path / "model" / "adapter_config.json").read_text()
    fields = adapter_config_to_save(model.peft_config["default"], model.get_base_model())
    assert text == config_text(fields) == json.dumps(json.loads(text), indent=2, sort_keys=True)
    saved = json.loads(text)
    assert saved["inference_mode"] is True and model.peft_config["default"].inference_mode is False
    assert saved["auto_mapping"] == {"base_model_class": "LlamaForCausalLM", "parent_library": type(model.get_base_model()).__module__}
    with safe_open(str(tmp_path / "model" / "adapter_model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    causal = get_peft_model(llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert adapter_config_to_save(causal.peft_config["default"], causal.get_base_model())["auto_mapping"] is None
    config = LoraConfig(target_modules=["q"], r=3)
    config.save_pretrained(str(tmp_path / "config"))
    assert (tmp_path / "config" / "adapter_config.json").read_text() == config_text(config.to_dict()) == config.to_json_string()
    assert PeftConfig.from_pretrained(str(tmp_path / "config")).to_dict() == config.to_dict()


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter", "config_given"])
def test_each_load_locates_the_adapter_once(tmp_path, monkeypatch, how):
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    calls = []
    original = adapter_folder.locate_adapter
    monkeypatch.setattr(adapter_folder, "locate_adapter", lambda *a, **k: calls.append(a) or original(*a, **k))
    if how == "from_pretrained":
        PeftModel.from_pretrained(llama(), str(tmp_path))
    elif how == "load_adapter":
        get_peft_model(llama(), LoraConfig(target_modules=["v_proj"])).load_adapter(str(tmp_path), adapter_name="other")
    else:
        PeftModel.from_pretrained(llama(), str(tmp_path), config=LoraConfig(target_modules=["q_proj"], r=8))
    assert len(calls) == 1


@pytest.mark.parametrize(
    "config",
    [IA3Config(target_modules=["q_proj"], feedforward_modules=[]), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)],
    ids=["ia3", "prompt_tuning"],
)
def test_weight_conversion_refused_by_the_default_save_hook(tmp_path, config):
    model = get_peft_model(llama(), config)
    model.save_pretrained(str(tmp_path / "init"))
    with pytest.raises(ConfigError, match=f"only supported for LoRA adapters, not {config.peft_type}"):
        model.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not os.path.exists(tmp_path / "out" / "adapter_config.json")
