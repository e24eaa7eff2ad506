"""LN tuning checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. A fresh LN tuning adapter is a
copy of the layer (a no-op), so the adapters here are perturbed or trained for a few steps.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    DIRECTIONS, check_checkpoint_parity, check_roundtrip, make_inputs, make_model, roundtrip_params,
    train_a_few_steps)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5

CASES = {
    "llama": ("llama", {}),
    "llama-bf16": ("llama-bf16", {}),
    "llama-attention-and-norm": ("llama", {"target_modules": ["q_proj", "norm"]}),
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {"target_modules": ["LayerNorm"]}),
    "t5": ("t5", {"exclude_modules": ["final_layer_norm"], "target_modules": ["layer_norm", "final_layer_norm"]}),
}


def perturbed(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".ln_tuning_layers." in name:
                param.add_((0.3 * torch.randn(param.shape, generator=generator)).to(param.dtype))
    return model


def wrap(lib_name: str, case: str):
    model_name, overrides = CASES[case]
    lib = LIBS[lib_name]
    config = lib.LNTuningConfig(task_type=MODEL_FACTORIES[model_name.removesuffix("-bf16")].task_type, **overrides)
    return perturbed(lib.get_peft_model(make_model(model_name), config)).eval()


@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_and_config_parity(case, tmp_path):
    files = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)
    assert any(".ln_tuning_layers." in key for key in files["peftkit"])


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
def test_trained_adapter_moves_across(direction, tmp_path):
    src_name, dst_name = direction
    lib = LIBS[src_name]
    torch.manual_seed(0)
    model = lib.get_peft_model(make_model("llama"), lib.LNTuningConfig(task_type="CAUSAL_LM"))
    inputs = make_inputs("llama")
    train_a_few_steps(model, inputs, 3, lr=5e-2, optimizer_cls=torch.optim.AdamW)
    check_roundtrip(LIBS, model, dst_name, partial(make_model, "llama"), inputs, tmp_path, ATOL)


@pytest.mark.parametrize("case", ["llama", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    merged = {}
    for lib_name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
        with torch.no_grad():
            merged[lib_name] = loaded.merge_and_unload().eval()
    theirs, ours = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    # peft's LN tuning unload leaves modules_to_save wrappers in the merged model (peftkit unwraps them):
    # compare the trained copy of the head with ours.
    theirs = {key.replace(".modules_to_save.default.", "."): value for key, value in theirs.items()
              if ".original_module." not in key}
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)
