"""Trainable Tokens checkpoints move between peft and peftkit: same keys, shapes, dtypes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: peft's
random init (`init_weights=False`) or a default adapter given a few optimizer steps. GPT-2 ties its
output layer to the embedding, so its files carry the rows under both modules, as peft writes them.
(peft 0.21.2 nests the output layer when it is also named in target_modules, or when a second adapter
is added to a tied model, and then fails in forward; those cases are peftkit-only, in
tests/test_trainable_tokens_method.py.)
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import make_inputs, make_model, output, read_config, read_weights  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
ATOL = 1e-5
ROWS = [7, 13, 14, 25, 49]

# name -> (model case, config overrides, steps of training from the default init (0: init_weights=False))
CASES = {
    "llama": ("llama", {}, 0),
    "llama-trained": ("llama", {"init_weights": True}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "gpt2-tied": ("gpt2", {}, 0),
    "gpt2-tied-trained": ("gpt2", {"init_weights": True}, 3),
    "bert": ("bert", {}, 0),
    "llama-named-target": ("llama", {"target_modules": ["embed_tokens"]}, 0),
}


def arch(name: str) -> str:
    return name.removesuffix("-bf16")


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    kwargs = dict(task_type=MODEL_FACTORIES[arch(model_name)].task_type, token_indices=ROWS, init_weights=False)
    kwargs.update(overrides)
    lib = LIBS[lib_name]
    torch.manual_seed(1234)
    model = lib.get_peft_model(make_model(model_name), lib.TrainableTokensConfig(**kwargs))
    if steps:
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        inputs = make_inputs(model_name)
        for _ in range(steps):
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


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
    assert type(loaded.base_model).__name__ == "TrainableTokensModel"
    torch.testing.assert_close(output(loaded, inputs), expected, atol=tolerance(case), rtol=0)
    in_file = read_weights(str(tmp_path))
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["llama", "llama-bf16", "gpt2-tied", "bert", "llama-named-target"])
def test_same_seed_builds_the_same_tensors(case, tmp_path):
    """From the same weights and seed both libraries hold identical tensors and write the same files."""
    models, dirs = {}, {}
    for lib_name in LIBS:
        models[lib_name] = wrap(lib_name, case)
        dirs[lib_name] = tmp_path / lib_name
        models[lib_name].save_pretrained(str(dirs[lib_name]))
    states = {name: model.state_dict() for name, model in models.items()}
    assert sorted(states["peftkit"]) == sorted(states["peft"])
    for key, tensor in states["peft"].items():
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=0, rtol=0, msg=key)
    theirs, ours = read_weights(str(dirs["peft"])), read_weights(str(dirs["peftkit"]))
    assert {k: (tuple(t.shape), t.dtype) for k, t in ours.items()} == {k: (tuple(t.shape), t.dtype) for k, t in theirs.items()}
    assert all(key.endswith(".trainable_tokens_delta") for key in ours) and ours
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert read_config(str(dirs["peftkit"]), comparable=True) == read_config(str(dirs["peft"]), comparable=True)
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("case", ["llama-trained", "gpt2-tied-trained", "bert"])
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
        torch.testing.assert_close(output(merged[lib_name], inputs), unmerged, atol=1e-4, rtol=0)
    theirs, ours = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)


def test_two_adapters_active_and_merged_match_peft():
    inputs = make_inputs("llama")
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        model = lib.get_peft_model(make_model("llama"), lib.TrainableTokensConfig(token_indices=[7, 13], init_weights=False))
        model.add_adapter("other", lib.TrainableTokensConfig(token_indices=[25, 49, 78], init_weights=False))
        model.base_model.set_adapter(["default", "other"])
        both = output(model, inputs)
        model.merge_adapter(["default"])
        model.merge_adapter(["other"])
        results[lib_name] = (both, output(model, inputs))
        model.unmerge_adapter()
        torch.testing.assert_close(output(model, inputs), both, atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("src_name", ["peft", "peftkit"])
def test_second_adapter_loads_beside_the_first(src_name, tmp_path):
    """load_adapter of a second checkpoint (disjoint rows) gives the same logits in both libraries."""
    src = LIBS[src_name]
    for i, rows in enumerate(([7, 13], [25, 49])):
        torch.manual_seed(i)
        model = src.get_peft_model(make_model("llama"), src.TrainableTokensConfig(token_indices=rows, init_weights=False))
        model.save_pretrained(str(tmp_path / str(i)))
    inputs = make_inputs("llama")
    outs = {}
    for lib_name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "0"))
        model.load_adapter(str(tmp_path / "1"), adapter_name="second")
        model.base_model.set_adapter(["default", "second"])
        outs[lib_name] = output(model, inputs)
    assert (outs["peft"] - output(make_model("llama"), inputs)).abs().max() > 1e-3
    torch.testing.assert_close(outs["peftkit"], outs["peft"], atol=ATOL, rtol=0)
