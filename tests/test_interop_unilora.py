"""Uni-LoRA checkpoints move between peft and peftkit: same keys, dtypes, config, logits, indices.

peft is a test-only dependency. The source adapter takes a few optimizer steps first; indices are
regenerated from `proj_seed` on loading unless `save_indices`, so a wrong assignment fails the test.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from tests.test_interop_vblora import DIRECTIONS, LIBS, check_roundtrip, check_same_layout, train_a_little  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = {
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama-save-indices": ("llama", {"target_modules": ["q_proj", "v_proj"], "save_indices": True}),
    "gpt2": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "proj_seed": 3}),
    "bert": ("bert", {"target_modules": ["query", "value"], "bias": "unilora_only"}),
}


def wrap(lib_name: str, case: str, seed: int = 1234):
    model_name, overrides = CASES[case]
    tiny = MODEL_FACTORIES[model_name]
    kwargs = dict(r=2, theta_d_length=50, init_weights=False, task_type=tiny.task_type, **overrides)
    model = tiny.make_model()
    torch.manual_seed(seed)
    return LIBS[lib_name].get_peft_model(model, LIBS[lib_name].UniLoraConfig(**kwargs))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS, ids=["peft->peftkit", "peftkit->peft"])
def test_trained_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    tiny = MODEL_FACTORIES[CASES[case][0]]
    src = wrap(src_name, case)
    train_a_little(src, tiny.make_inputs())
    check_roundtrip(src, LIBS[dst_name], tiny.make_model, tiny.make_inputs(), tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_same_files_and_config(case, tmp_path):
    check_same_layout({lib: wrap(lib, case) for lib in LIBS}, tmp_path)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_same_seed_gives_same_theta_and_indices(case):
    """theta_d draws, the placeholder index draws and the seeded assignment all follow peft."""
    after, buffers = {}, {}
    for lib in LIBS:
        model = wrap(lib, case, seed=11)
        after[lib] = torch.randn(3)  # the RNG is left where peft leaves it
        buffers[lib] = {n: b for n, b in model.named_buffers() if "unilora_" in n}
        buffers[lib]["theta"] = model.base_model.unilora_theta_d["default"].detach()
    assert torch.equal(after["peft"], after["peftkit"])
    assert sorted(buffers["peft"]) == sorted(buffers["peftkit"])
    for key, tensor in buffers["peft"].items():
        assert buffers["peftkit"][key].dtype == tensor.dtype, key
        torch.testing.assert_close(buffers["peftkit"][key], tensor, atol=0, rtol=0, msg=key)
