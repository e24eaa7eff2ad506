"""BEFT checkpoints move between peft and peftkit: same keys, shapes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
random biases (`init_weights=False`) or a default (no-op) adapter given a few optimizer steps, so
an adapter that is not loaded, or loaded into the wrong place, changes the outputs.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests import interop_helpers  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    assert_same_tensors, check_checkpoint_parity, check_merge_parity, check_roundtrip, merge_both_adapters, output,
    roundtrip_params, seeded_peft_model)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5


class MLP(nn.Module):
    """Biased and bias-free Linear layers, and a head that is never wrapped."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin1(torch.relu(self.lin0(x)))))


TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "t5": ["q", "v", "wo"],
    "mlp": ["lin0", "lin1", "head"],
}

# name -> (model, config overrides, steps of training from the default init (0: init_weights=False))
CASES = {
    "llama": ("llama", {}, 0),
    "llama-trained": ("llama", {"init_weights": True}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-default-targets": ("llama", {"target_modules": None}, 0),
    "bert": ("bert", {}, 0),
    "bert-trained": ("bert", {"init_weights": True}, 3),
    "t5": ("t5", {}, 0),
    "mlp": ("mlp", {}, 0),
    "mlp-modules-to-save": ("mlp", {"target_modules": ["lin0"], "modules_to_save": ["head"]}, 0),
}


def make_model(name: str) -> nn.Module:
    return MLP().eval() if name == "mlp" else interop_helpers.make_model(name)


def make_inputs(name: str) -> dict:
    if name == "mlp":
        return {"x": torch.randn(4, 6, generator=torch.Generator().manual_seed(1))}
    return interop_helpers.make_inputs(name)


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {} if arch == "mlp" else {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "BeftConfig", kwargs, model_name, steps, make_model, make_inputs)


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "BeftModel")


@pytest.mark.parametrize("case", ["llama", "bert", "mlp-modules-to-save", "llama-default-targets", "llama-bf16"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    ours = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)["peftkit"]
    assert any(key.endswith(".beft_bias") for key in ours) and not any(".default" in key for key in ours)


def test_same_seed_draws_the_same_adapter():
    """peftkit draws the biases as peft does (N(0, 1), in module order): one seed, one adapter."""
    states = {}
    for lib_name in LIBS:
        model = wrap(lib_name, "bert")
        states[lib_name] = {k: v for k, v in model.state_dict().items() if "beft_" in k}
    assert_same_tensors(states["peftkit"], states["peft"])


@pytest.mark.parametrize("case", ["bert", "bert-trained", "mlp-modules-to-save"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)


def test_two_adapters_merged_in_turn_match_peft():
    inputs = make_inputs("mlp")
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        model = lib.get_peft_model(make_model("mlp"), lib.BeftConfig(target_modules=["lin0"], init_weights=False))
        model.add_adapter("other", lib.BeftConfig(target_modules=["lin0", "head"], init_weights=False))
        results[lib_name] = merge_both_adapters(model, inputs)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=ATOL, rtol=0)
    assert (results["peftkit"][0] - output(make_model("mlp"), inputs)).abs().max() > 1e-3


def test_merge_without_base_bias_fails_in_both():
    """llama's projections have no bias: peft and peftkit both refuse to merge (peftkit merges nothing)."""
    for lib_name in LIBS:
        model = wrap(lib_name, "llama")
        with pytest.raises(ValueError, match="Base layer has no bias, cannot merge bias adapter default"):
            model.merge_adapter()
