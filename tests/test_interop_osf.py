"""OSF checkpoints move between peft and peftkit: same keys, shapes, config, logits, and the same
projected gradients.

peft is a test-only dependency; the module is skipped without it. Only U_low, S_low, V_low are
saved (both libraries rebuild the frozen SVD parts from the base weight), so these tests also check
that the rebuild agrees. Adapters start random (`init_weights=False`) or are trained for a few steps.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    DIRECTIONS, check_checkpoint_parity, check_merge_parity, check_roundtrip, make_inputs, make_model, output,
    roundtrip_params, seeded_peft_model, train_a_few_steps)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

CASES = {
    "llama": ("llama", {"effective_rank": 0.75}),
    "llama-default-rank": ("llama", {}),
    "llama-rank-pattern": ("llama", {"effective_rank": 20, "rank_pattern": {"down_proj": 0.5, "v_proj": 30}}),
    "llama-default-targets": ("llama", {"target_modules": None, "effective_rank": 0.875}),
    "llama-bf16": ("llama-bf16", {"effective_rank": 0.75}),
    "bert": ("bert", {"target_modules": ["query", "value", "dense"], "effective_rank": 0.75}),
    "t5": ("t5", {"target_modules": ["q", "v", "wo"], "effective_rank": 0.9}),
}


def wrap(lib_name: str, case: str):
    model_name, overrides = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs = {"init_weights": False, "task_type": MODEL_FACTORIES[arch].task_type, "target_modules": LLAMA_TARGETS,
              **overrides}
    return seeded_peft_model(LIBS[lib_name], "OSFConfig", kwargs, model_name)


@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_and_config_parity(case, tmp_path):
    files = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)
    adapter_keys = [key for key in files["peftkit"] if ".osf_svd_params." in key]
    assert {key.rpartition(".")[2] for key in adapter_keys} == {"U_low", "S_low", "V_low"}
    others = set(files["peftkit"]) - set(adapter_keys)  # only a SEQ_CLS head (modules_to_save) besides
    assert all(".classifier." in key for key in others), sorted(others)


def _train(lib_name: str, steps: int = 3):
    lib = LIBS[lib_name]
    config = lib.OSFConfig(target_modules=LLAMA_TARGETS, effective_rank=0.5, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = lib.get_peft_model(make_model("llama"), config)
    return train_a_few_steps(model, make_inputs("llama"), steps, lr=5e-2, optimizer_cls=torch.optim.AdamW)


def test_projected_gradients_match_peft_hooks():
    """peft projects with parameter hooks, peftkit inside autograd: the gradients must agree."""
    grads = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(0)
        config = lib.OSFConfig(target_modules=LLAMA_TARGETS, effective_rank=0.5, init_weights=False)
        model = lib.get_peft_model(make_model("llama"), config)
        model.train()
        model(**make_inputs("llama")).loss.backward()
        grads[lib_name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads["peft"]) == sorted(grads["peftkit"])
    for name, grad in grads["peft"].items():
        torch.testing.assert_close(grads["peftkit"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_is_the_same_in_both():
    ours, theirs = _train("peftkit"), _train("peft")
    inputs = make_inputs("llama")
    torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
def test_trained_adapter_moves_across(direction, tmp_path):
    """A few optimizer steps from the identity init, logits equal in the other library."""
    src_name, dst_name = direction
    model = _train(src_name)
    inputs = make_inputs("llama")
    check_roundtrip(LIBS, model, dst_name, partial(make_model, "llama"), inputs, tmp_path, ATOL)


@pytest.mark.parametrize("case", ["llama", "bert", "llama-bf16"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), atol=ATOL)


def test_unmerge_refusal_matches_peft():
    errors = {}
    for lib_name in LIBS:
        model = wrap(lib_name, "llama")
        model.merge_adapter()
        with pytest.raises(NotImplementedError) as info:
            model.unmerge_adapter()
        errors[lib_name] = str(info.value)
    assert errors["peftkit"] == errors["peft"]
