"""HiRA checkpoints move between peft and peftkit: same keys, shapes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
peft's random init (`init_weights=False`) or a default (no-op) adapter given a few optimizer steps,
so an adapter that is not loaded, or loaded into the wrong place, changes the outputs.
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
    check_checkpoint_parity, check_merge_parity, check_roundtrip, merge_both_adapters, roundtrip_params,
    seeded_peft_model)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5


class ConvNet(nn.Module):
    """Conv1d, Conv2d (3x3 and 1x1), Conv3d and Linear, each a HiRA target."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv3d = nn.Conv3d(2, 3, kernel_size=(1, 2, 2))
        self.conv = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.pointwise = nn.Conv2d(6, 4, kernel_size=1)
        self.seq_conv = nn.Conv1d(4, 5, kernel_size=3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv3d(x)).mean(dim=2)
        h = torch.relu(self.pointwise(torch.relu(self.conv(h)))).flatten(2)
        return self.head(torch.tanh(self.seq_conv(h)).mean(dim=2))


TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value", "dense"],
    "t5": ["q", "v", "wo"],
    "conv": ["conv3d", "conv", "pointwise", "seq_conv", "head"],
}

# name -> (model, config overrides, steps of training from the default init (0: init_weights=False))
CASES = {
    "llama": ("llama", {}, 0),
    "llama-trained": ("llama", {"init_weights": True}, 3),
    "llama-gaussian-trained": ("llama", {"init_weights": "gaussian"}, 3),
    "llama-embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}, 0),
    "llama-embedding-trained": ("llama", {"target_modules": ["embed_tokens", "v_proj"], "init_weights": True}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-layers": ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}, 0),
    "llama-dropout": ("llama", {"hira_dropout": 0.1}, 0),
    "gpt2": ("gpt2", {}, 0),
    "gpt2-fan-in-fan-out": ("gpt2", {"fan_in_fan_out": True}, 0),
    "bert": ("bert", {}, 0),
    "t5": ("t5", {}, 0),
    "conv": ("conv", {}, 0),
    "conv-trained": ("conv", {"init_weights": True}, 3),
}


def make_model(name: str) -> nn.Module:
    return ConvNet().eval() if name == "conv" else interop_helpers.make_model(name)


def make_inputs(name: str) -> dict:
    if name == "conv":
        return {"x": torch.randn(2, 2, 2, 5, 5, generator=torch.Generator().manual_seed(1))}
    return interop_helpers.make_inputs(name)


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {} if arch == "conv" else {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(r=2, target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "HiraConfig", kwargs, model_name, steps, make_model, make_inputs)


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "HiraModel")


@pytest.mark.parametrize("case", ["llama", "llama-embedding", "gpt2", "conv", "llama-bf16"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    ours = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)["peftkit"]
    assert any(".hira_A" in key for key in ours) and not any(".default" in key for key in ours)


@pytest.mark.parametrize("case", ["llama", "llama-embedding-trained", "gpt2", "conv"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)


def test_two_adapters_merged_in_turn_match_peft(tmp_path):
    """Two adapters on the same modules, merged one after the other: both fold into W0, as in peft."""
    inputs = make_inputs("llama")
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        model = lib.get_peft_model(make_model("llama"), lib.HiraConfig(r=2, target_modules=["q_proj"], init_weights=False))
        model.add_adapter("other", lib.HiraConfig(r=3, target_modules=["q_proj", "v_proj"], init_weights=False))
        results[lib_name] = merge_both_adapters(model, inputs)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=1e-4, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peftkit"][0], atol=1e-4, rtol=0)


def test_rank_pattern_sizes_as_in_peft(tmp_path):
    """peft 0.21.2 applies rank_pattern only when adding to a wrapped module; shapes must agree."""
    shapes = {}
    for lib_name, lib in LIBS.items():
        model = lib.get_peft_model(make_model("llama"), lib.HiraConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 5}))
        model.add_adapter("other", lib.HiraConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 5}))
        shapes[lib_name] = {k: tuple(v.shape) for k, v in model.state_dict().items() if "hira_" in k}
    assert shapes["peftkit"] == shapes["peft"]
    assert any(shape[0] == 5 for key, shape in shapes["peft"].items() if "hira_A.other" in key)
