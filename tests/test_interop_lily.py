"""Lily checkpoints move between peft and peftkit: same keys (shared A/B repeated under every layer),
shapes, config, logits and trainable-parameter counts.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
random Bs (`init_weights=False`) or the zero-B default given a few optimizer steps, so an adapter
that is not loaded, loaded into the wrong place, or shared differently, changes the outputs.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import make_inputs, make_model, output, read_config, read_weights  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
ATOL = 1e-5

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "t5": ["q", "v", "wo"],
}

# name -> (model, config overrides, steps of training)
CASES = {
    "llama": ("llama", {}, 0),
    "llama-default-trained": ("llama", {"init_weights": True, "stride_A": 2}, 3),
    "llama-stride2": ("llama", {"stride_A": 2, "num_B": 3, "scaling": 0.5}, 0),
    "llama-regex": ("llama", {"target_modules": r".*\.(q|v)_proj"}, 0),
    "llama-bf16": ("llama-bf16", {}, 0),
    "bert": ("bert", {"stride_A": 2}, 0),
    "t5": ("t5", {}, 0),
}


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(r=4, target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    lib = LIBS[lib_name]
    torch.manual_seed(1234)
    model = lib.get_peft_model(make_model(model_name), lib.LilyConfig(**kwargs))
    if steps:
        train(model, make_inputs(model_name), steps)
    return model.eval()


def train(model: nn.Module, inputs: dict, steps: int) -> None:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("case", "src_name", "dst_name"),
    [pytest.param(c, s, d, id=f"{c}-{s}->{d}") for c in CASES for s, d in DIRECTIONS],
)
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    src = wrap(src_name, case)
    inputs = make_inputs(model_name)
    expected = output(src, inputs)
    assert (expected.float() - output(make_model(model_name), inputs).float()).abs().max() > 1e-3, "vacuous adapter"
    src.save_pretrained(str(tmp_path))

    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path), is_trainable=True).eval()
    assert type(loaded.base_model).__name__ == "LilyModel"
    torch.testing.assert_close(output(loaded, inputs), expected, atol=tolerance(case), rtol=0)
    assert loaded.get_nb_trainable_parameters() == src.get_nb_trainable_parameters()  # shared as the source shared
    in_file = read_weights(tmp_path)
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["llama", "llama-stride2", "llama-regex", "llama-bf16", "bert"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, the same adapter_config.json and
    count the same trainable parameters (each shared tensor once)."""
    models, dirs = {}, {}
    for lib_name in LIBS:
        models[lib_name] = wrap(lib_name, case)
        dirs[lib_name] = tmp_path / lib_name
        models[lib_name].save_pretrained(str(dirs[lib_name]))
    theirs, ours = read_weights(dirs["peft"]), read_weights(dirs["peftkit"])
    layout = {key: (tuple(t.shape), t.dtype) for key, t in ours.items()}
    assert layout == {key: (tuple(t.shape), t.dtype) for key, t in theirs.items()}
    assert any(".lily_B.weight" in key for key in ours) and not any(".default" in key for key in ours)
    assert read_config(dirs["peftkit"], comparable=True) == read_config(dirs["peft"], comparable=True)
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]
