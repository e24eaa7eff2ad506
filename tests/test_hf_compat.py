"""peftkit.utils.hf_compat: the KV cache argument found by signature, on the installed transformers
and on models spelling it the other way (`past_key_values` up to transformers 5.23, `cache` from 5.24)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM, T5ForConditionalGeneration

from peftkit import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from peftkit.utils.hf_compat import (
    cache_argument,
    checkpointing_argument,
    enable_activation_checkpointing,
    get_cache,
    is_activation_checkpointing,
    pop_cache,
    put_cache,
    rename_cache,
)
from tests.properties import assert_differs
from tests.tiny_models import llama

#: How the installed transformers spells it (the subclasses below translate to it).
INSTALLED = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def test_cache_argument_reads_the_signature():
    def new(input_ids=None, cache=None): ...
    def old(input_ids=None, past_key_values=None): ...
    def both(input_ids=None, past_key_values=None, cache=None): ...
    def none(input_ids=None, **kwargs): ...
    assert cache_argument(new) == "cache"
    assert cache_argument(old) == "past_key_values"
    assert cache_argument(both) == "cache"  # during a deprecation window the new name wins
    assert cache_argument(none) is None


@pytest.mark.parametrize("model_class", [LlamaForCausalLM, GPT2LMHeadModel, T5ForConditionalGeneration, BertModel])
def test_installed_transformers_models_take_a_cache_we_can_name(model_class):
    assert cache_argument(model_class.forward) == INSTALLED


def test_pop_put_and_rename():
    kwargs = {"past_key_values": "kv", "input_ids": 1}
    assert get_cache(kwargs) == "kv" and "past_key_values" in kwargs
    model = torch.nn.Module()
    model.forward = lambda input_ids=None, cache=None: None
    assert rename_cache(kwargs, model) == {"input_ids": 1, "cache": "kv"}
    assert put_cache(kwargs, "new", model) == "cache" and kwargs["cache"] == "new" and "past_key_values" not in kwargs
    assert pop_cache(kwargs) == "new" and "cache" not in kwargs
    assert pop_cache({"past_key_values": None}) is None
    with pytest.raises(ValueError, match="both 'cache' and 'past_key_values'"):
        pop_cache({"cache": 1, "past_key_values": 2})


def _forward_installed(model, takes: str, arguments: dict):
    """Call the installed LlamaForCausalLM.forward with the cache a subclass took under `takes`."""
    arguments = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}
    extra, cache = arguments.pop("kwargs"), arguments.pop(takes)
    assert not set(extra) & {"cache", "past_key_values"}, "the cache reached the model under a name its forward does not take"
    return LlamaForCausalLM.forward(model, **arguments, **extra, **{INSTALLED: cache})


class PastKeyValuesLlama(LlamaForCausalLM):
    """A forward that takes the cache as `past_key_values` only (the transformers <= 5.23 spelling)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        return _forward_installed(self, "past_key_values", locals())


class CacheLlama(LlamaForCausalLM):
    """A forward that takes the cache as `cache` only (the transformers >= 5.24 spelling)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        return _forward_installed(self, "cache", locals())


def _tiny(model_class):
    model = model_class(llama().config).eval()
    model.load_state_dict(llama().state_dict())
    model.generation_config.eos_token_id = None
    return model


def _greedy_by_hand(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
    return ids


CONFIGS = {
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "p_tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8),
}


@pytest.mark.parametrize("model_class", [PastKeyValuesLlama, CacheLlama, LlamaForCausalLM])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_prompt_learning_forward_and_cached_generate_under_either_name(model_class, method):
    torch.manual_seed(1)
    model = get_peft_model(_tiny(model_class), CONFIGS[method]())
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -ids.shape[1]:]
    assert_differs(logits, _tiny(LlamaForCausalLM)(input_ids=ids).logits.detach())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, _greedy_by_hand(model, ids, 4))
    renamed = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not renamed, f"peftkit passed a deprecated cache name: {renamed}"


def test_prefix_forward_refuses_a_cache_under_two_names():
    model = get_peft_model(_tiny(LlamaForCausalLM), CONFIGS["prefix"]())
    ids = torch.tensor([[3, 4, 5, 6]])
    with pytest.raises(ValueError, match="pass it once"):
        model(input_ids=ids, cache=object(), past_key_values=object())


class _OldCheckpointingModel(torch.nn.Module):
    """transformers <= 5.22's API: gradient_checkpointing_enable(gradient_checkpointing_kwargs=)."""

    is_gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.is_gradient_checkpointing, self.options = True, gradient_checkpointing_kwargs


def test_activation_checkpointing_under_either_api():
    old = _OldCheckpointingModel()
    enable_activation_checkpointing(old, {"use_reentrant": False}, every_n_layers=1, offload=False)
    assert is_activation_checkpointing(old) and old.options == {"use_reentrant": False}
    with pytest.raises(ValueError, match="every_n_layers need transformers >= 5.23"):
        enable_activation_checkpointing(_OldCheckpointingModel(), None, every_n_layers=2)
    model = llama()
    assert not is_activation_checkpointing(model)
    enable_activation_checkpointing(model, {"use_reentrant": False})
    assert is_activation_checkpointing(model)


def test_checkpointing_argument_names_a_real_training_argument(tmp_path):
    from transformers import TrainingArguments

    flag = checkpointing_argument(TrainingArguments)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{flag: True})
    assert getattr(args, flag) is True
    assert checkpointing_argument(args) == flag


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generation_step_moves_cache_position_past_the_virtual_tokens(method):
    """transformers < 5.4 hands `cache_position` to every generate step; it must count the virtual tokens."""
    from transformers import DynamicCache

    from peftkit.tuners._prompt.inputs import prepare_generation_step

    model = get_peft_model(_tiny(LlamaForCausalLM), CONFIGS[method]())
    first = prepare_generation_step(model.base_model, "default", {
        "input_ids": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "cache_position": torch.arange(4), "past_key_values": DynamicCache(),
    })
    assert first["cache_position"].tolist() == ([0, 1, 2, 3, 4, 5, 6] if method == "prompt" else [3, 4, 5, 6])
    past = DynamicCache()
    past.update(torch.zeros(1, 2, 7, 8), torch.zeros(1, 2, 7, 8), 0)  # virtual tokens + prompt already cached
    later = prepare_generation_step(model.base_model, "default", {
        "input_ids": torch.tensor([[9]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
        "cache_position": torch.tensor([4]), "past_key_values": past,
    })
    assert later["cache_position"].tolist() == [7] and later["attention_mask"].shape == (1, 8)
