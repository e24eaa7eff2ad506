"""VeRA checkpoints move between peft and peftkit: same keys, shapes, dtypes, config, logits.

peft is a test-only dependency; the module is skipped without it. The source adapter starts from
random lambdas (init_weights=False) and takes a few optimizer steps, so an adapter that is not
loaded, or loaded into the wrong place, changes the outputs and the test fails. The projections
are drawn from `projection_prng_key` exactly as peft draws them: with `save_projection=False`
the file holds only the lambdas and both libraries rebuild the same pair.
"""

from __future__ import annotations

import os

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.test_interop_vblora import (  # noqa: E402
    DIRECTIONS,
    check_roundtrip,
    check_same_layout,
    read_weights,
    train_a_little,
)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5

CASES = {
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "gpt2": ("gpt2", {"target_modules": ["c_attn", "c_proj"]}),
    "bert": ("bert", {"target_modules": ["query", "value"]}),
    "llama-no-projection": ("llama", {"target_modules": ["q_proj", "o_proj"], "save_projection": False,
                                      "projection_prng_key": 42}),
    "llama-bias": ("llama", {"target_modules": ["q_proj", "v_proj"], "bias": "all"}),
    "llama-dropout": ("llama", {"target_modules": ["q_proj", "v_proj"], "vera_dropout": 0.1, "d_initial": 0.5}),
}


def wrap(lib_name: str, case: str, seed: int = 1234, **extra):
    model_name, overrides = CASES[case]
    tiny = MODEL_FACTORIES[model_name]
    kwargs = dict(r=8, init_weights=False, task_type=tiny.task_type)
    kwargs.update(overrides)
    kwargs.update(extra)
    config = LIBS[lib_name].VeraConfig(**kwargs)
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


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_same_seed_gives_the_same_adapter_and_projections(case):
    """peft's draws (projections from the PRNG key, lambda_d from the global RNG) are kept: same tensors."""
    states = {lib: LIBS[lib].get_peft_model_state_dict(wrap(lib, case, seed=7)) for lib in LIBS}
    assert sorted(states["peft"]) == sorted(states["peftkit"])
    assert "base_model.vera_A" in states["peftkit"]
    for key, tensor in states["peft"].items():
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=0, rtol=0, msg=key)


def test_projection_only_file_is_rebuilt_identically(tmp_path):
    """A peft file without the projections: peftkit's rebuilt pair is peft's, bit for bit."""
    src = wrap("peft", "llama-no-projection")
    src.save_pretrained(str(tmp_path))
    assert not any("vera_A" in key for key in read_weights(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(MODEL_FACTORIES["llama"].make_model(), str(tmp_path))
    assert torch.equal(loaded.base_model.vera_A["default"], src.base_model.vera_A["default"])
    assert torch.equal(loaded.base_model.vera_B["default"], src.base_model.vera_B["default"])


def test_second_adapter_in_subfolder_roundtrip(tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    inputs = tiny.make_inputs()
    for src_name, dst_name in DIRECTIONS:
        src = wrap(src_name, "llama")
        config = LIBS[src_name].VeraConfig(r=8, target_modules=["o_proj"], init_weights=False, d_initial=0.4)
        src.add_adapter("other", config)
        src.set_adapter("other")
        expected = output_of(src, inputs)
        folder = tmp_path / src_name
        src.save_pretrained(str(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder / "other"))
        loaded = LIBS[dst_name].PeftModel.from_pretrained(tiny.make_model(), str(folder))
        loaded.load_adapter(str(folder / "other"), adapter_name="other")
        loaded.set_adapter("other")
        torch.testing.assert_close(output_of(loaded, inputs), expected, atol=ATOL, rtol=0)


def output_of(model, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits
