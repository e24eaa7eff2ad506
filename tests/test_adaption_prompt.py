"""Adaption prompts (LLaMA-Adapter): config checks, which layers are wrapped, the gated prompt attention
by hand (llama, gpt2, mistral with grouped-query attention), zero-gate init, generation with the KV
cache, several adapters (one active), and the shared property suite. Merging does not apply (the
prompts are extra attention, not a weight update): merging is refused, as the capabilities say.

Fresh adapters are the base model (gate 0), so the property checks that need a visible adapter run
with `opened_gates`: every new gate starts at 0.5 instead.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import MistralConfig, MistralForCausalLM

from peftkit import AdaptionPromptConfig, AdaptionPromptModel, ConfigError, PeftConfig, PeftModel, get_peft_model
from peftkit import get_peft_model_state_dict
from peftkit.errors import AdapterStateError, TargetModulesError
from peftkit.registry import MERGE, method_spec
from peftkit.tuners.adaption_prompt.layer import AdaptedAttention
from tests import properties as prop
from tests.tiny_models import VOCAB, bert_seq_cls, gpt2, llama, lm_inputs


def mistral(head_dim: int = 16) -> MistralForCausalLM:
    """A tiny Mistral with grouped-query attention (4 query heads, 2 key/value heads) and head_dim * heads != hidden."""
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=head_dim, vocab_size=VOCAB, max_position_embeddings=64,
                           initializer_range=0.2)
    return MistralForCausalLM(config).eval()


MODELS = {"llama": llama, "gpt2": gpt2, "mistral": mistral}
ATTENTION = {"llama": "self_attn", "gpt2": "attn", "mistral": "self_attn"}


def config_for(**overrides) -> AdaptionPromptConfig:
    kwargs = dict(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2)
    kwargs.update(overrides)
    return AdaptionPromptConfig(**kwargs)


def attention_modules(model: nn.Module, name: str) -> list[nn.Module]:
    return [module for key, module in model.named_modules() if key.endswith("." + ATTENTION[name])]


@pytest.fixture
def opened_gates(monkeypatch):
    """Every adapter created in the test starts with gate 0.5 (a visible adapter; peft's init is 0)."""
    original = AdaptedAttention.update_layer

    def update_layer(self, adapter_name, *args, **kwargs):
        original(self, adapter_name, *args, **kwargs)
        with torch.no_grad():
            self.adaption_gate[adapter_name].fill_(0.5)

    monkeypatch.setattr(AdaptedAttention, "update_layer", update_layer)


def open_gates(model: nn.Module, value: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaption_gate" in name:
                param.fill_(value)
    return model


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(AdaptionPromptConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.AdaptionPromptConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    config = AdaptionPromptConfig()
    assert (config.target_modules, config.adapter_len, config.adapter_layers) == (None, None, None)
    assert config.is_adaption_prompt and not config.is_prompt_learning and str(config.peft_type) == "ADAPTION_PROMPT"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"adapter_len": 0}, "adapter_len=0 is invalid"),
        ({"adapter_len": 2.0}, "adapter_len=2.0 is invalid"),
        ({"adapter_layers": -1}, "adapter_layers=-1 is invalid"),
        ({"adapter_layers": True}, "adapter_layers=True is invalid"),
        ({"target_modules": ["self_attn"]}, "target_modules=\\['self_attn'\\] is invalid"),
        ({"target_modules": ""}, "target_modules='' is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdaptionPromptConfig(**kwargs)


@pytest.mark.parametrize("missing", ["adapter_len", "adapter_layers"])
def test_sizes_are_required_when_the_adapter_is_added(missing):
    model = llama()
    with pytest.raises(ConfigError, match=f"AdaptionPromptConfig.{missing} is not set"):
        get_peft_model(model, config_for(**{missing: None}))
    assert not any(isinstance(m, AdaptedAttention) for m in model.modules())


def test_unsupported_model_types_and_too_many_layers_are_refused():
    with pytest.raises(ConfigError, match="Unsupported model type for adaption prompt: 'bert'"):
        get_peft_model(bert_seq_cls(), config_for(task_type="SEQ_CLS"))
    model = llama()
    with pytest.raises(ConfigError, match="more adapter layers '3' than the model has '2'"):
        get_peft_model(model, config_for(adapter_layers=3))
    with pytest.raises(TargetModulesError, match="No module of LlamaForCausalLM ends with '.attention'"):
        get_peft_model(model, config_for(target_modules="attention"))
    assert not any(isinstance(m, AdaptedAttention) for m in model.modules())
    with pytest.raises(ConfigError, match="adapter_len=100000000 .* as implausible"):
        get_peft_model(model, config_for(adapter_len=10**8))


@pytest.mark.parametrize("name", list(MODELS))
def test_the_top_layers_are_wrapped_and_target_modules_resolved(name, tmp_path):
    model = get_peft_model(MODELS[name](), config_for(adapter_layers=1, adapter_len=3))
    assert type(model.base_model) is AdaptionPromptModel
    assert model.peft_config["default"].target_modules == ATTENTION[name]
    wrapped = [isinstance(m, AdaptedAttention) for m in attention_modules(model, name)]
    assert wrapped == [False] * (len(wrapped) - 1) + [True]
    keys = sorted(get_peft_model_state_dict(model))
    top = len(wrapped) - 1
    stem = f"base_model.model.model.layers.{top}.self_attn" if name != "gpt2" else f"base_model.model.transformer.h.{top}.attn"
    assert keys == [f"{stem}.adaption_gate", f"{stem}.adaption_prompt"]
    trainable = sorted(n.removesuffix(".default") for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == keys
    model.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is AdaptionPromptConfig
    assert (loaded.target_modules, loaded.adapter_len, loaded.adapter_layers) == (ATTENTION[name], 3, 1)


# ---------------------------------------------------------------------------------------------- the maths
def _captured_call(model: nn.Module, layer: AdaptedAttention, inputs: dict) -> dict:
    """The keywords (and positional hidden states) the decoder layer passes to `layer` in a forward of `model`."""
    seen = {}

    def hook(_module, args, kwargs):
        seen.update(kwargs)
        if args:
            seen["hidden_states"] = args[0]

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _by_hand(attn, prompt, gate, hidden, queries, keys, values, head_dim):
    """gate * softmax(q k^T / sqrt(d)) v, per head, keys/values shared among the query heads of a group."""
    rows, length = hidden.shape[:2]
    n_heads = queries.shape[-1] // head_dim
    q = queries.view(rows, length, n_heads, head_dim).transpose(1, 2)
    k = keys.view(1, -1, keys.shape[-1] // head_dim, head_dim).transpose(1, 2)
    v = values.view(1, -1, values.shape[-1] // head_dim, head_dim).transpose(1, 2)
    group = n_heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return q, k, v


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_llama_like_prompt_attention_by_hand(name):
    model = open_gates(get_peft_model(MODELS[name](), config_for(adapter_layers=1, adapter_len=3)), 0.8).eval()
    layer = attention_modules(model, name)[-1]
    attn = layer.base_layer
    call = _captured_call(model, layer, lm_inputs())
    hidden, (cos, sin) = call["hidden_states"], call["position_embeddings"]
    prompt, gate = layer.adaption_prompt["default"].detach(), layer.adaption_gate["default"].detach()
    with torch.no_grad():
        q, k, v = _by_hand(attn, prompt, gate, hidden, attn.q_proj(hidden), attn.k_proj(prompt), attn.v_proj(prompt),
                           attn.head_dim)
        q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)  # rotary on the queries only
        weights = gate * F.softmax(q @ k.transpose(2, 3) / math.sqrt(attn.head_dim), dim=-1)
        added = attn.o_proj((weights @ v).transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1))
        expected = attn(**call)[0] + added
        prop.assert_close(layer(**call)[0], expected)
    assert added.abs().max() > 1e-2


def test_gpt2_prompt_attention_by_hand():
    model = open_gates(get_peft_model(gpt2(), config_for(adapter_layers=1, adapter_len=3)), 0.8).eval()
    layer = attention_modules(model, "gpt2")[-1]
    attn = layer.base_layer
    call = _captured_call(model, layer, lm_inputs())
    hidden = call.pop("hidden_states")
    prompt, gate = layer.adaption_prompt["default"].detach(), layer.adaption_gate["default"].detach()
    with torch.no_grad():
        queries = attn.c_attn(hidden)[..., :32]
        _, keys, values = attn.c_attn(prompt).split(32, dim=2)
        q, k, v = _by_hand(attn, prompt, gate, hidden, queries, keys, values, attn.head_dim)
        weights = gate * F.softmax(q @ k.transpose(2, 3) / math.sqrt(attn.head_dim), dim=-1)
        added = (weights @ v).transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)  # no c_proj, as peft
        prop.assert_close(layer(hidden, **call)[0], attn(hidden, **call)[0] + added)
    assert added.abs().max() > 1e-2


@pytest.mark.parametrize("name", list(MODELS))
def test_zero_gate_init_is_the_base_model_and_the_gate_learns_first(name):
    make = MODELS[name]
    model = get_peft_model(make(), config_for())
    layers = attention_modules(model, name)[-2:]
    for layer in layers:
        assert torch.equal(layer.adaption_gate["default"], torch.zeros(1))
        assert layer.adaption_prompt["default"].abs().sum() > 0 and layer.adaption_prompt["default"].shape == (1, 4, 32)
    inputs = lm_inputs()
    prop.assert_close(prop.output_of(model, inputs), prop.output_of(make(), inputs), atol=0)
    model.train()
    model(**inputs).loss.backward()
    for layer in layers:
        assert layer.adaption_gate["default"].grad.abs().sum() > 0
        assert torch.equal(layer.adaption_prompt["default"].grad, torch.zeros(1, 4, 32))  # gated off at g = 0


def test_bf16_base_keeps_the_adapter_in_bf16_as_peft():
    model = get_peft_model(llama().to(torch.bfloat16), config_for())
    layer = attention_modules(model, "llama")[-1]
    assert layer.adaption_prompt["default"].dtype == torch.bfloat16 == layer.adaption_gate["default"].dtype
    out = open_gates(model)(**lm_inputs()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_with_the_cache_equals_greedy_decoding_by_hand(name):
    model = open_gates(get_peft_model(MODELS[name](), config_for()), 0.9).eval()
    ids = lm_inputs()["input_ids"]
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               pad_token_id=0)
    tokens = ids
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=tokens, use_cache=False).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)
    with model.disable_adapter():
        base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              pad_token_id=0)
    assert not torch.equal(base, generated), "the prompts must change what is generated, or the check is vacuous"


# ---------------------------------------------------------------------------------------------- adapters
def test_several_adapters_one_active(opened_gates, tmp_path):
    model = get_peft_model(llama(), config_for(adapter_layers=1, adapter_len=3))
    model.add_adapter("other", config_for(adapter_layers=2, adapter_len=5))
    inputs = lm_inputs()
    assert model.active_adapter == "default"
    trainable = sorted(n.removesuffix(".default") for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.model.layers.1.self_attn.adaption_gate",
                         "base_model.model.model.layers.1.self_attn.adaption_prompt"]
    first = prop.output_of(model, inputs)
    model.set_adapter("other")
    second = prop.output_of(model, inputs)
    prop.assert_differs(first, second)
    assert len([n for n, p in model.named_parameters() if p.requires_grad]) == 4
    with pytest.raises(ConfigError, match="one adapter at a time"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapter == "other"
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), "other")
    prop.assert_close(prop.output_of(loaded, inputs), first, atol=0)
    loaded.set_adapter("other")
    prop.assert_close(prop.output_of(loaded, inputs), second, atol=0)
    model.delete_adapter("other")
    assert model.active_adapter == "default"
    prop.assert_close(prop.output_of(model, inputs), first, atol=0)
    assert isinstance(model.base_model.model.model.layers[1].self_attn, AdaptedAttention)
    assert not isinstance(model.base_model.model.model.layers[0].self_attn, AdaptedAttention)


def test_merging_is_refused_as_the_capabilities_say(opened_gates):
    assert MERGE not in method_spec("ADAPTION_PROMPT").capabilities
    model = get_peft_model(llama(), config_for())
    for call in (model.merge_adapter, model.merge_and_unload, model.unmerge_adapter):
        with pytest.raises(AdapterStateError, match="cannot be merged"):
            call()
    unloaded = model.unload()
    assert not any(isinstance(m, AdaptedAttention) for m in unloaded.modules())
    prop.assert_close(prop.output_of(unloaded, lm_inputs()), prop.output_of(llama(), lm_inputs()), atol=0)


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(MODELS))
def make_model(request):
    return MODELS[request.param]


def test_fresh_adapter_is_noop(make_model):
    prop.fresh_adapter_is_noop(make_model, lm_inputs(), config_for())


def test_disable_gives_base(make_model, opened_gates):
    prop.check_disable_gives_base(make_model, lm_inputs(), config_for())


def test_save_load_roundtrip(make_model, opened_gates, tmp_path):
    prop.check_save_load_roundtrip(make_model, lm_inputs(), config_for(), tmp_path)


def test_only_adapter_params_train(make_model, opened_gates):
    prop.check_only_adapter_params_train(make_model, lm_inputs(), config_for())


def test_adapters_switch(make_model, opened_gates):
    prop.check_adapters_switch(make_model, lm_inputs(), config_for(), config_for(adapter_layers=1, adapter_len=2))


@pytest.mark.parametrize("gated", [False, True])
def test_training_lowers_loss(make_model, gated, request):
    if gated:
        request.getfixturevalue("opened_gates")
    prop.check_training_lowers_loss(make_model, lm_inputs(), config_for(), lr=5e-2)
