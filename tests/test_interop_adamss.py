"""AdaMSS checkpoints move between peft and peftkit: same keys, shapes, dtypes, config, logits; same merge.

peft (and scikit-learn) are test-only dependencies; the module is skipped without them. Both libraries
build the subspaces from the base weights with the same seeded randomized SVD and the same KMeans,
so the same seed gives identical tensors; adapters are non-trivial: `init_weights=None` (random B) or
the default (B = 0) after a few optimizer steps.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("sklearn")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    check_merge_parity,
    check_roundtrip,
    check_same_seed_tensors,
    make_inputs,
    make_model,
    output,
    read_config,
    read_weights,
    roundtrip_params,
    seeded_peft_model,
)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}

# name -> (model, config overrides, steps of training from the default init (0: init_weights=None))
CASES = {
    "llama": ("llama", {}, 0),
    "llama-trained": ("llama", {"init_weights": "orthogonal"}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-dynamic": ("llama", {"use_dynamic_rank": True, "svd_threshold": 0.3, "subspace_rank": 3}, 0),
    "llama-seed": ("llama", {"random_seed": 5, "num_subspaces": 3}, 0),
    "bert": ("bert", {}, 0),  # biased Linear layers: the bias column
    "t5": ("t5", {"subspace_rank": 1}, 0),
}


def arch(name: str) -> str:
    return name.removesuffix("-bf16")


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    kwargs = dict(task_type=MODEL_FACTORIES[arch(model_name)].task_type, target_modules=TARGETS[arch(model_name)],
                  r=6, num_subspaces=2, subspace_rank=2, init_weights=None)
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "AdamssConfig", kwargs, model_name, steps=steps)


@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, lambda: make_model(model_name), make_inputs(model_name),
                    tmp_path, atol=tolerance(case), tuner_name="AdamssModel", min_change=1e-4)


@pytest.mark.parametrize("case", ["llama", "llama-bf16", "llama-dynamic", "bert", "t5"])
def test_same_seed_builds_the_same_tensors(case, tmp_path):
    models = {name: wrap(name, case) for name in LIBS}
    files = check_same_seed_tensors(models, tmp_path)
    ours = files["peftkit"]
    assert any(key.endswith(".adamss_newB") for key in ours) and any(".adamss_A.0" in key for key in ours)
    assert not any(".default" in key for key in ours)


@pytest.mark.parametrize("case", ["llama-trained", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, lambda: make_model(model_name), make_inputs(model_name), atol=ATOL)


def test_config_file_matches_peft(tmp_path):
    for lib_name, lib in LIBS.items():
        lib.AdamssConfig(target_modules=["q_proj"], r=8, use_asa=True, asa_target_subspaces=3).save_pretrained(
            str(tmp_path / lib_name))
    assert read_config(tmp_path / "peftkit", comparable=True) == read_config(tmp_path / "peft", comparable=True)


def test_two_adapters_active_and_merged_match_peft():
    inputs = make_inputs("llama")
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        model = lib.get_peft_model(make_model("llama"), lib.AdamssConfig(target_modules=["q_proj"], r=4,
                                                                         num_subspaces=2, init_weights=None))
        model.add_adapter("other", lib.AdamssConfig(target_modules=["q_proj", "v_proj"], r=3, num_subspaces=3,
                                                    subspace_rank=2, init_weights=None))
        model.base_model.set_adapter(["default", "other"])
        both = output(model, inputs)
        model.merge_adapter(["default", "other"])
        results[lib_name] = (both, output(model, inputs))
        model.unmerge_adapter()
        torch.testing.assert_close(output(model, inputs), both, atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=1e-4, rtol=0)


def test_asa_masks_the_same_subspaces_as_peft():
    inputs = make_inputs("llama")
    masks = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(3)
        config = lib.AdamssConfig(target_modules=["q_proj", "v_proj"], r=6, num_subspaces=3, init_weights=None,
                                  use_asa=True, asa_target_subspaces=2, init_warmup=1, final_warmup=4, mask_interval=2)
        model = lib.get_peft_model(make_model("llama"), config)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for step in range(1, 6):
            model(**inputs).loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
        masks[lib_name] = {name: p.requires_grad for name, p in model.named_parameters() if "adamss_" in name}
        assert masks[lib_name] and not all(masks[lib_name].values())
    assert masks["peftkit"] == masks["peft"]


def test_saved_keys_have_no_adapter_name(tmp_path):
    model = wrap("peftkit", "llama")
    model.save_pretrained(str(tmp_path))
    keys = set(read_weights(tmp_path))
    assert {key.rsplit(".", 2)[-2] for key in keys if ".adamss_A." in key} == {"adamss_A"}
