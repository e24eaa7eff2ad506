"""RandLoRA checkpoints move between peft and peftkit: same keys, dtypes, config, logits, and bases.

peft is a test-only dependency. The source adapter takes a few optimizer steps first. With
`save_projection=False` the bases are not in the file: each library draws them again from
`projection_prng_key`, so this only passes if both draw the very same bases.
"""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from tests.test_interop_vblora import DIRECTIONS, LIBS, check_roundtrip, check_same_layout, train_a_little  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = {
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama-no-projection": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "save_projection": False}),
    "llama-sparse": ("llama", {"target_modules": ["q_proj", "v_proj"], "sparse": True, "save_projection": False}),
    "llama-very-sparse": ("llama", {"target_modules": ["k_proj", "o_proj"], "very_sparse": True, "projection_prng_key": 5}),
    "gpt2": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "save_projection": False}),
    "bert": ("bert", {"target_modules": ["query", "value"], "bias": "randlora_only"}),
}


def wrap(lib_name: str, case: str, seed: int = 1234):
    model_name, overrides = CASES[case]
    tiny = MODEL_FACTORIES[model_name]
    kwargs = dict(r=4, randlora_alpha=8, init_weights=False, task_type=tiny.task_type, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LIBS[lib_name].RandLoraConfig(**kwargs)
    model = tiny.make_model()
    torch.manual_seed(seed)
    return LIBS[lib_name].get_peft_model(model, config)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS, ids=["peft->peftkit", "peftkit->peft"])
def test_trained_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    tiny = MODEL_FACTORIES[CASES[case][0]]
    src = wrap(src_name, case)
    train_a_little(src, tiny.make_inputs(), lr=0.01)
    check_roundtrip(src, LIBS[dst_name], tiny.make_model, tiny.make_inputs(), tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_same_files_and_config(case, tmp_path):
    check_same_layout({lib: wrap(lib, case) for lib in LIBS}, tmp_path)


@pytest.mark.parametrize("case", ["llama", "llama-sparse", "llama-very-sparse", "gpt2"])
def test_same_seed_gives_same_bases_and_scalings(case):
    tensors = {}
    for lib in LIBS:
        model = wrap(lib, case, seed=9)
        tensors[lib] = {n: t.detach() for n, t in [*model.named_buffers(), *model.named_parameters()] if "randlora_" in n}
    assert sorted(tensors["peft"]) == sorted(tensors["peftkit"])
    for key, tensor in tensors["peft"].items():
        assert tensors["peftkit"][key].dtype == tensor.dtype, key
        torch.testing.assert_close(tensors["peftkit"][key], tensor, atol=0, rtol=0, msg=key)
