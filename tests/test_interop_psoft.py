"""PSOFT checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. A and B are not saved (both
libraries rebuild them from the base weight's SVD), so these tests also check that the rebuild
agrees. Adapters start perturbed (`init_weights=False`) or are trained for a few steps.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    DIRECTIONS, check_checkpoint_parity, check_merge_parity, check_roundtrip, make_inputs, make_model,
    roundtrip_params, seeded_peft_model, train_a_few_steps)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

CASES = {
    "llama": ("llama", {}),
    "llama-pissa-lowrank": ("llama", {"ab_svd_init": "pissa_init", "psoft_svd": "lowrank", "random_seed": 4,
                                      "psoft_svd_lowrank_niter": 3}),
    "llama-neumann": ("llama", {"use_cayley_neumann": True, "num_cayley_neumann_terms": 3, "cayley_neumann_eps": 0.9}),
    "llama-free-r": ("llama", {"psoft_orth": False, "psoft_mag_b": False}),
    "llama-bf16": ("llama-bf16", {}),
    "bert": ("bert", {"target_modules": ["query", "value", "dense"]}),
    "t5": ("t5", {"target_modules": ["q", "v", "wo"], "layers_to_transform": [0], "layers_pattern": "block"}),
}


def wrap(lib_name: str, case: str):
    model_name, overrides = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs = {"r": 4, "psoft_alpha": 8, "init_weights": False, "task_type": MODEL_FACTORIES[arch].task_type,
              "target_modules": LLAMA_TARGETS, **overrides}
    return seeded_peft_model(LIBS[lib_name], "PsoftConfig", kwargs, model_name)


@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_and_config_parity(case, tmp_path):
    files = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)
    assert any(key.endswith(".psoft_R.weight") for key in files["peftkit"])


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
def test_trained_adapter_moves_across(direction, tmp_path):
    """A few optimizer steps from the identity init, logits equal in the other library."""
    src_name, dst_name = direction
    lib = LIBS[src_name]
    config = lib.PsoftConfig(r=4, psoft_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = lib.get_peft_model(make_model("llama"), config)
    inputs = make_inputs("llama")
    train_a_few_steps(model, inputs, 3, lr=5e-2, optimizer_cls=torch.optim.AdamW)
    check_roundtrip(LIBS, model, dst_name, partial(make_model, "llama"), inputs, tmp_path, ATOL)


@pytest.mark.parametrize("case", ["llama", "llama-neumann", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), atol=ATOL)
