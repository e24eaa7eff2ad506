"""Poly checkpoints move between peft and peftkit: same keys (router logits included), shapes, config
and logits for the same `task_ids`; the same seed gives the same adapter in both.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: random B
(`init_weights=False`) and router logits drawn from N(0, 1) (so each task routes differently), or
the zero-B default given a few optimizer steps; an adapter not loaded, loaded into the wrong place,
or routed by the wrong task changes the outputs.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    check_checkpoint_parity, check_roundtrip, check_same_seed_tensors, make_inputs, make_model, output,
    roundtrip_params, seeded_peft_model)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5
TASK_IDS = (2, 0)

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "output.dense"],  # not the pooler: peft's Poly needs (rows, tokens, features) inputs
    "t5": ["q", "v", "wo"],
}

# name -> (model, config overrides, steps of training)
CASES = {
    "llama": ("llama", {}, 0),
    "llama-mhr": ("llama", {"n_splits": 4, "n_skills": 3}, 0),
    "llama-default-trained": ("llama", {"init_weights": True}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "bert": ("bert", {}, 0),
    "t5": ("t5", {"n_splits": 2}, 0),
}


def batch(model_name: str) -> dict:
    return {**make_inputs(model_name), "task_ids": torch.tensor(TASK_IDS)}


def randomize_routers(model: torch.nn.Module, seed: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "poly_router" in name:
                param.normal_()
    return model


def wrap(lib_name: str, case: str, randomize: bool = True):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(r=2, n_tasks=3, n_skills=2, n_splits=1, target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    model = seeded_peft_model(LIBS[lib_name], "PolyConfig", kwargs, model_name, steps, make_batch=batch)
    return randomize_routers(model) if randomize else model


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    inputs = batch(model_name)
    loaded = check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), inputs,
                             tmp_path, tolerance(case), "PolyModel")
    # the routing matters: other task ids give other logits
    other = {**inputs, "task_ids": torch.tensor([1, 1])}
    assert not torch.allclose(output(loaded, other), output(loaded, inputs), atol=1e-3)


@pytest.mark.parametrize("case", ["llama", "llama-mhr", "bert"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    files = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)
    ours = files["peftkit"]
    assert any(key.endswith(".poly_router.module_logits") for key in ours)
    assert not any(".default" in key for key in ours)


@pytest.mark.parametrize("case", ["llama-mhr", "llama-bf16"])
def test_same_seed_gives_the_same_adapter_and_logits(case, tmp_path):
    models = {name: wrap(name, case, randomize=False) for name in LIBS}
    check_same_seed_tensors(models, tmp_path)
    inputs = batch(CASES[case][0])
    torch.testing.assert_close(output(models["peftkit"], inputs), output(models["peft"], inputs), atol=0, rtol=0)


def test_generate_matches_peft(tmp_path):
    wrap("peft", "llama").save_pretrained(str(tmp_path))
    ids = make_inputs("llama")["input_ids"]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor(TASK_IDS),
                  max_new_tokens=5, do_sample=False, pad_token_id=0)
    generated = {}
    for name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
        generated[name] = loaded.generate(**kwargs)
    assert torch.equal(generated["peftkit"], generated["peft"])
