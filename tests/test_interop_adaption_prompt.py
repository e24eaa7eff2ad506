"""Adaption-prompt checkpoints move between peft and peftkit: the same keys (`<attention>.adaption_prompt`,
`<attention>.adaption_gate`), shapes, dtypes, config and logits, on llama, gpt2 and mistral; the same
seed gives the same prompts; several adapters saved by peft load as peft saved them.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: the
gates (zero at init) are set to 0.7, or the zero-gate default is given a few optimizer steps.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    assert_same_tensors, check_checkpoint_parity, check_roundtrip, make_inputs, output, read_config, roundtrip_params,
    seeded_peft_model)
from tests.interop_helpers import make_model as make_tiny  # noqa: E402
from tests.tiny_models import VOCAB  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5


def mistral() -> MistralForCausalLM:
    """Tiny Mistral, grouped-query attention (head_dim * heads == hidden: peft's query recomputation needs it)."""
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2)
    return MistralForCausalLM(config).eval()


def make_model(name: str) -> torch.nn.Module:
    return mistral() if name == "mistral" else make_tiny(name)


def batch(name: str) -> dict:
    return make_inputs("llama" if name == "mistral" else name)


# name -> (model, config overrides, steps of training)
CASES = {
    "llama": ("llama", {}, 0),
    "llama-one-layer": ("llama", {"adapter_layers": 1, "adapter_len": 7}, 0),
    "llama-default-trained": ("llama", {}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "gpt2": ("gpt2", {}, 0),
    "gpt2-default-trained": ("gpt2", {}, 3),
    "mistral": ("mistral", {"adapter_layers": 3}, 0),
}


def open_gates(model: torch.nn.Module, value: float = 0.7, adapter: str = "") -> torch.nn.Module:
    """Set the gates to `value`: all of them, or (`adapter`) the active adapter's -- peft keeps only the active
    adapter's modules in the model, peftkit holds every adapter's tensors under `<key>.<adapter name>`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            held_by = name.rpartition(".")[2]
            if "adaption_gate" in name and (not adapter or held_by in ("adaption_gate", adapter)):
                param.fill_(value)
    return model


def wrap(lib_name: str, case: str, gates: bool = True):
    model_name, overrides, steps = CASES[case]
    kwargs = dict(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2)
    kwargs.update(overrides)
    model = seeded_peft_model(LIBS[lib_name], "AdaptionPromptConfig", kwargs, model_name, steps,
                              make_base=make_model, make_batch=batch)
    return open_gates(model) if gates and not steps else model


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, lambda: make_model(model_name), batch(model_name),
                    tmp_path, tolerance(case), "AdaptionPromptModel")


@pytest.mark.parametrize("case", ["llama", "llama-bf16", "gpt2", "mistral"])
def test_same_seed_gives_the_same_prompts_files_and_logits(case, tmp_path):
    """Both libraries draw the same prompts, and write the same keys, dtypes and adapter_config.json."""
    models = {name: wrap(name, case, gates=False) for name in LIBS}
    # the adapters' tensors (the modules' own layouts differ: peft's `.model.` and per-adapter dicts here)
    states = {name: lib.get_peft_model_state_dict(models[name]) for name, lib in LIBS.items()}
    assert_same_tensors(states["peftkit"], states["peft"])
    files = check_checkpoint_parity({name: open_gates(model) for name, model in models.items()}, tmp_path)
    assert all(key.endswith((".adaption_prompt", ".adaption_gate")) for key in files["peftkit"])
    config = read_config(tmp_path / "peftkit")
    assert config["target_modules"] == ("attn" if case == "gpt2" else "self_attn")
    inputs = batch(CASES[case][0])
    torch.testing.assert_close(output(models["peftkit"], inputs), output(models["peft"], inputs), atol=0, rtol=0)


def test_checkpoint_parity_of_a_trained_adapter(tmp_path):
    check_checkpoint_parity({name: wrap(name, "llama-default-trained") for name in LIBS}, tmp_path)


@pytest.mark.parametrize(("src_name", "dst_name"), [("peft", "peftkit"), ("peftkit", "peft")])
def test_several_adapters_move_together(src_name, dst_name, tmp_path):
    """Two adapters (different layers and lengths) saved in one folder; both load, and each gives its logits."""
    src_lib, dst_lib = LIBS[src_name], LIBS[dst_name]
    torch.manual_seed(5)
    src = src_lib.get_peft_model(make_model("llama"), src_lib.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3,
                                                                                    adapter_layers=1))
    src.add_adapter("other", src_lib.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=5, adapter_layers=2))
    inputs = batch("llama")
    expected = {}
    for name in ("other", "default"):
        src.set_adapter(name)
        open_gates(src, 0.6 if name == "default" else 0.9, adapter=name)
        expected[name] = output(src.eval(), inputs)
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)
    src.save_pretrained(str(tmp_path))
    loaded = dst_lib.PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
    loaded.load_adapter(str(tmp_path / "other"), "other")
    torch.testing.assert_close(output(loaded, inputs), expected["default"], atol=ATOL, rtol=0)
    loaded.set_adapter("other")
    torch.testing.assert_close(output(loaded, inputs), expected["other"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_matches_peft(name, tmp_path):
    wrap("peft", name).save_pretrained(str(tmp_path))
    ids = batch(name)["input_ids"]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    generated = {lib_name: lib.PeftModel.from_pretrained(make_model(name), str(tmp_path)).eval().generate(**kwargs)
                 for lib_name, lib in LIBS.items()}
    assert torch.equal(generated["peftkit"], generated["peft"])
