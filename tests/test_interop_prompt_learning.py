"""Prompt-learning checkpoints cross between peftkit and Hugging Face peft (test-only dependency) with equal logits."""

from __future__ import annotations

import pytest
import torch

import peftkit
from tests.peft_support import peft_prefix_forward_failure, peft_prefix_generate_failure, skip_if_peft_fails
from tests.properties import assert_close, assert_differs, output_of
from tests.tiny_models import bert_seq_cls, cls_inputs, gpt2, llama, lm_inputs

peft = pytest.importorskip("peft")

MODELS = {"llama": (llama, lm_inputs, "CAUSAL_LM"), "gpt2": (gpt2, lm_inputs, "CAUSAL_LM"), "bert": (bert_seq_cls, cls_inputs, "SEQ_CLS")}
METHODS = {
    "prompt": lambda lib, task: lib.PromptTuningConfig(task_type=task, num_virtual_tokens=3),
    "prefix": lambda lib, task: lib.PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
    "prefix_projection": lambda lib, task: lib.PrefixTuningConfig(task_type=task, num_virtual_tokens=3, prefix_projection=True),
    "p_tuning_mlp": lambda lib, task: lib.PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=8),
    "p_tuning_lstm": lambda lib, task: lib.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=3, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
    ),
}
CASES = [(m, k) for m in MODELS for k in METHODS if not (m == "gpt2" and k.startswith("p_tuning_lstm"))]


def _trained_head(model) -> None:
    """Move the classifier copy away from its init, so the saved head is checked too."""
    for name, param in model.named_parameters():
        if "modules_to_save" in name:
            with torch.no_grad():
                param.add_(0.3)


def _skip_where_peft_cannot_run(method, make_model, make_inputs, task) -> None:
    if method.startswith("prefix"):
        skip_if_peft_fails(peft_prefix_forward_failure(make_model, make_inputs, task))


@pytest.mark.parametrize("model_name,method", CASES)
def test_peft_checkpoint_loads_in_peftkit(tmp_path, model_name, method):
    make_model, make_inputs, task = MODELS[model_name]
    _skip_where_peft_cannot_run(method, make_model, make_inputs, task)
    inputs = make_inputs()
    torch.manual_seed(3)
    reference = peft.get_peft_model(make_model(), METHODS[method](peft, task))
    _trained_head(reference)
    reference.save_pretrained(tmp_path)
    expected = output_of(reference, inputs)
    assert_differs(expected[..., -inputs["input_ids"].shape[1]:, :] if task == "CAUSAL_LM" else expected, output_of(make_model(), inputs))
    loaded = peftkit.PeftModel.from_pretrained(make_model(), tmp_path)
    assert_close(output_of(loaded, inputs), expected)


@pytest.mark.parametrize("model_name,method", CASES)
def test_peftkit_checkpoint_loads_in_peft(tmp_path, model_name, method):
    make_model, make_inputs, task = MODELS[model_name]
    _skip_where_peft_cannot_run(method, make_model, make_inputs, task)
    inputs = make_inputs()
    torch.manual_seed(3)
    model = peftkit.get_peft_model(make_model(), METHODS[method](peftkit, task))
    _trained_head(model)
    expected = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_model(), tmp_path)
    assert_close(output_of(loaded, inputs), expected)
    # Same key set and config fields as a file peft writes itself.
    torch.manual_seed(3)
    peft.get_peft_model(make_model(), METHODS[method](peft, task)).save_pretrained(tmp_path / "peft")
    ours = peftkit.PeftConfig.from_pretrained(str(tmp_path)).to_dict()
    theirs = peftkit.PeftConfig.from_pretrained(str(tmp_path / "peft")).to_dict()
    for key in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers",
                "encoder_hidden_size", "prefix_projection"):
        assert ours.get(key) == theirs.get(key), key


def test_peft_and_peftkit_generate_the_same_tokens(tmp_path):
    skip_if_peft_fails(peft_prefix_generate_failure(llama))
    torch.manual_seed(3)
    reference = peft.get_peft_model(llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    reference.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(llama(), tmp_path)
    ids = torch.tensor([[0, 5, 6, 7], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(**kwargs), reference.generate(**kwargs))
