"""DeLoRA checkpoints move between peft and peftkit: same keys (the column-norm buffer included),
shapes, config and logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
random A and B (`init_weights=False`) or the zero-B default given a few optimizer steps, so an
adapter that is not loaded, or loaded into the wrong place, changes the outputs.
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
    "llama-default-trained": ("llama", {"init_weights": True}, 3),
    "llama-patterns": ("llama", {"rank_pattern": {"v_proj": 2}, "lambda_pattern": {"q_proj": 7}}, 0),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-dropout": ("llama", {"module_dropout": 0.1}, 0),
    "bert": ("bert", {}, 0),
    "bert-bias-all-trained": ("bert", {"bias": "all"}, 3),
    "bert-delora-only-bias-trained": ("bert", {"bias": "delora_only"}, 3),
    "t5": ("t5", {}, 0),
}


def loss_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    result = model(**inputs)
    return result.square().mean() if isinstance(result, torch.Tensor) else result.loss


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(r=4, delora_lambda=3, target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    lib = LIBS[lib_name]
    torch.manual_seed(1234)
    model = lib.get_peft_model(make_model(model_name), lib.DeloraConfig(**kwargs))
    if steps:
        train(model, make_inputs(model_name), steps)
    return model.eval()


def train(model: nn.Module, inputs: dict, steps: int) -> None:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss_of(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


def without_head_bias_copies(state: dict) -> dict:
    # peft's quirk with bias="all": it also writes the head's unused `original_module.bias` and
    # `modules_to_save.bias`; peftkit accepts them from peft's files but does not write them.
    return {k: v for k, v in state.items() if not k.endswith((".original_module.bias", ".modules_to_save.bias"))}


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

    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path)).eval()
    assert type(loaded.base_model).__name__ == "DeloraModel"
    torch.testing.assert_close(output(loaded, inputs), expected, atol=tolerance(case), rtol=0)
    in_file = without_head_bias_copies(read_weights(tmp_path))
    in_model = without_head_bias_copies(LIBS[dst_name].get_peft_model_state_dict(loaded))
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["llama", "llama-patterns", "llama-bf16", "bert-delora-only-bias-trained"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    models, dirs = {}, {}
    for lib_name in LIBS:
        models[lib_name] = wrap(lib_name, case)
        dirs[lib_name] = tmp_path / lib_name
        models[lib_name].save_pretrained(str(dirs[lib_name]))
    theirs, ours = read_weights(dirs["peft"]), read_weights(dirs["peftkit"])
    layout = {key: (tuple(t.shape), t.dtype) for key, t in ours.items()}
    assert layout == {key: (tuple(t.shape), t.dtype) for key, t in theirs.items()}
    assert any(key.endswith(".delora_w_norm") for key in ours) and not any(".default" in key for key in ours)
    for key, tensor in theirs.items():  # the frozen norms come from the same base weights
        if key.endswith(".delora_w_norm"):
            torch.testing.assert_close(ours[key], tensor, atol=1e-6, rtol=0, msg=key)
    assert read_config(dirs["peftkit"], comparable=True) == read_config(dirs["peft"], comparable=True)
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("case", ["llama", "llama-default-trained", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    inputs = make_inputs(model_name)
    merged = {}
    for lib_name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
        unmerged = output(loaded, inputs)
        with torch.no_grad():
            merged[lib_name] = loaded.merge_and_unload().eval()
    theirs, ours = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    torch.testing.assert_close(output(merged["peftkit"], inputs), unmerged, atol=1e-4, rtol=0)
