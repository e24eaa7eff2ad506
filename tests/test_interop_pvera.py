"""PVeRA checkpoints move between peft and peftkit: same keys, shapes, dtypes, config, logits.

peft is a test-only dependency; the module is skipped without it. The source adapter starts from
random lambdas and takes a few optimizer steps (sampling z, as training does); logits are compared
in eval mode, where both libraries use the mean. With `sample_at_inference` and a `generator_seed`
both draw the same noise, so even sampled outputs agree.
"""

from __future__ import annotations

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

CASES = {
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "gpt2": ("gpt2", {"target_modules": ["c_attn", "c_proj"]}),
    "bert": ("bert", {"target_modules": ["query", "value"]}),
    "llama-no-projection": ("llama", {"target_modules": ["q_proj", "o_proj"], "save_projection": False,
                                      "projection_prng_key": 42}),
    "llama-bias": ("llama", {"target_modules": ["q_proj", "v_proj"], "bias": "pvera_only"}),
}


def wrap(lib_name: str, case: str, seed: int = 1234, **extra):
    model_name, overrides = CASES[case]
    tiny = MODEL_FACTORIES[model_name]
    kwargs = dict(r=8, init_weights=False, task_type=tiny.task_type)
    kwargs.update(overrides)
    kwargs.update(extra)
    model = tiny.make_model()
    torch.manual_seed(seed)
    return LIBS[lib_name].get_peft_model(model, LIBS[lib_name].PveraConfig(**kwargs))


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


def test_same_seed_gives_the_same_adapter_and_projections():
    states = {lib: LIBS[lib].get_peft_model_state_dict(wrap(lib, "gpt2", seed=7)) for lib in LIBS}
    assert sorted(states["peft"]) == sorted(states["peftkit"]) and "base_model.pvera_A" in states["peft"]
    for key, tensor in states["peft"].items():
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=0, rtol=0, msg=key)


def test_sampled_outputs_agree_with_the_same_generator_seed():
    tiny = MODEL_FACTORIES["llama"]
    inputs = tiny.make_inputs()
    outputs = {}
    for lib in LIBS:
        model = wrap(lib, "llama", seed=5, sample_at_inference=True, generator_seed=9)
        model.eval()
        with torch.no_grad():
            outputs[lib] = [model(**inputs).logits for _ in range(2)]
    assert not torch.allclose(outputs["peft"][0], outputs["peft"][1])  # it does sample
    for ours, theirs in zip(outputs["peftkit"], outputs["peft"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_projection_free_file_is_rebuilt_identically(tmp_path):
    src = wrap("peft", "llama-no-projection")
    src.save_pretrained(str(tmp_path))
    assert not any("pvera_A" in key for key in read_weights(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(MODEL_FACTORIES["llama"].make_model(), str(tmp_path))
    assert torch.equal(loaded.base_model.pvera_A["default"], src.base_model.pvera_A["default"])
    assert torch.equal(loaded.base_model.pvera_B["default"], src.base_model.pvera_B["default"])
