"""Cartridge checkpoints move between peft and peftkit with the same logits; equal seeds give equal
tensors and files; the prefill helpers and composition agree with peft's.

peft is a test-only dependency; the module is skipped without it. Cartridge tables start as N(0, 1)
entries, far from "no prefix", so a table that is not loaded (or loaded split wrongly) changes the logits.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    assert_same_tensors, make_inputs, make_model, output, read_config, read_weights, roundtrip_params, seeded_peft_model)
from tests.peft_support import peft_prefix_forward_failure, peft_prefix_generate_failure, skip_if_peft_fails  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
CASES = ["llama", "gpt2", "bert", "t5"]


def _skip_where_peft_cannot_run(case: str) -> None:
    factory = MODEL_FACTORIES[case]
    skip_if_peft_fails(peft_prefix_forward_failure(factory.make_model, factory.make_inputs, factory.task_type))


def wrap(lib_name: str, case: str, frozen: int = 2):
    kwargs = dict(task_type=MODEL_FACTORIES[case].task_type, num_virtual_tokens=4, num_frozen_tokens=frozen)
    return seeded_peft_model(LIBS[lib_name], "CartridgeConfig", kwargs, case)


def _encoder(model):
    return model.base_model.prompt_encoder["default"] if isinstance(model, peftkit.PeftModel) else model.prompt_encoder["default"]


@pytest.mark.parametrize("case,src,dst", roundtrip_params(CASES))
def test_roundtrip_gives_the_same_logits(tmp_path, case, src, dst):
    _skip_where_peft_cannot_run(case)
    model = wrap(src, case)
    inputs = make_inputs(case)
    expected = output(model, inputs)
    assert (expected - output(make_model(case), inputs)).abs().max() > 1e-3, "vacuous adapter"
    model.save_pretrained(str(tmp_path))
    loaded = LIBS[dst].PeftModel.from_pretrained(make_model(case), str(tmp_path)).eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=1e-5, rtol=0)
    assert_same_tensors(LIBS[dst].get_peft_model_state_dict(loaded), read_weights(str(tmp_path)))
    assert torch.equal(_encoder(loaded).frozen_embedding, _encoder(model).frozen_embedding)


@pytest.mark.parametrize("frozen", [0, 1, 3])
@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_equal_seeds_give_equal_tensors_counts_and_files(tmp_path, case, frozen):
    models = {name: wrap(name, case, frozen) for name in LIBS}
    ours, theirs = _encoder(models["peftkit"]).state_dict(), _encoder(models["peft"]).state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert models["peftkit"].get_nb_trainable_parameters() == models["peft"].get_nb_trainable_parameters()
    for name, model in models.items():
        model.save_pretrained(str(tmp_path / name))
    assert_same_tensors(read_weights(str(tmp_path / "peftkit")), read_weights(str(tmp_path / "peft")))
    assert read_config(str(tmp_path / "peftkit"), comparable=True) == read_config(str(tmp_path / "peft"), comparable=True)


def test_generate_gives_the_same_tokens(tmp_path):
    skip_if_peft_fails(peft_prefix_generate_failure(MODEL_FACTORIES["llama"].make_model))
    reference = wrap("peft", "llama")
    reference.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(make_model("llama"), str(tmp_path))
    ids = torch.tensor([[0, 5, 6, 7], [3, 4, 5, 6]])
    kwargs = dict(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), max_new_tokens=4,
                  do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(**kwargs), reference.generate(**kwargs))


def test_prefill_helpers_agree_with_peft_s():
    with torch.no_grad():
        cache = make_model("llama")(input_ids=torch.tensor([[11, 12, 13, 14, 15, 16]]), use_cache=True).past_key_values
    ours = peftkit.prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=4)
    theirs = peft.prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=4)
    assert torch.equal(ours, theirs)
    models = {name: wrap(name, "llama") for name in LIBS}
    for name, lib in LIBS.items():
        lib.initialize_kv_prefix_from_past_key_values(models[name], past_key_values=cache)
    inputs = make_inputs("llama")
    torch.testing.assert_close(output(models["peftkit"], inputs), output(models["peft"], inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("composer", ["peft", "peftkit"])
def test_composed_cartridges_load_in_both(tmp_path, composer):
    wrap("peft", "llama").save_pretrained(str(tmp_path / "a"))
    seeded_peft_model(peftkit, "CartridgeConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3, num_frozen_tokens=0),
                      "llama", seed=9).save_pretrained(str(tmp_path / "b"))
    LIBS[composer].compose_cartridge_adapters([str(tmp_path / "a"), str(tmp_path / "b")], output_path=str(tmp_path / "ab"))
    assert read_config(str(tmp_path / "ab"))["num_virtual_tokens"] == 7
    inputs = make_inputs("llama")
    logits = {name: output(lib.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "ab")), inputs)
              for name, lib in LIBS.items()}
    torch.testing.assert_close(logits["peftkit"], logits["peft"], atol=1e-5, rtol=0)
