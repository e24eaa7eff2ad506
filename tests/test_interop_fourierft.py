"""FourierFT checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. Only the coefficients are saved:
loading rebuilds the frequency locations from `random_loc_seed`, so these tests also pin that both
libraries draw the same locations. The source adapter takes a few optimizer steps first.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from tests.test_interop_vblora import (  # noqa: E402
    ATOL,
    DIRECTIONS,
    LIBS,
    check_roundtrip,
    check_same_layout,
    output,
    train_a_little,
)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

CASES = {
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "gpt2": ("gpt2", {"target_modules": ["c_attn", "c_proj"]}),
    "bert": ("bert", {"target_modules": ["query", "value"], "n_frequency_pattern": {"value": 9}}),
    "llama-zero-init": ("llama", {"target_modules": ["q_proj", "v_proj"], "init_weights": True, "random_loc_seed": 3}),
    "llama-bias": ("llama", {"target_modules": ["gate_proj"], "bias": "all"}),
}


def wrap(lib_name: str, case: str, seed: int = 1234):
    model_name, overrides = CASES[case]
    tiny = MODEL_FACTORIES[model_name]
    kwargs = dict(n_frequency=20, scaling=30.0, task_type=tiny.task_type)
    kwargs.update(overrides)
    config = LIBS[lib_name].FourierFTConfig(**kwargs)
    model = tiny.make_model()
    torch.manual_seed(seed)
    return LIBS[lib_name].get_peft_model(model, config)


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
def test_same_seed_gives_the_same_adapter_and_logits(case):
    """peft's draw order (randn per wrapped module) and locations are kept: same seed, same outputs."""
    models = {lib: wrap(lib, case, seed=7) for lib in LIBS}
    states = {lib: LIBS[lib].get_peft_model_state_dict(model) for lib, model in models.items()}
    assert sorted(states["peft"]) == sorted(states["peftkit"])
    for key, tensor in states["peft"].items():
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=0, rtol=0, msg=key)
    inputs = MODEL_FACTORIES[CASES[case][0]].make_inputs()
    torch.testing.assert_close(output(models["peftkit"], inputs), output(models["peft"], inputs), atol=ATOL, rtol=0)


def test_spectral_path_matches_peft_logits():
    """The FFT-per-row forward (never materialising delta_W) gives peft's logits."""
    models = {lib: wrap(lib, "llama", seed=11) for lib in LIBS}
    for _, layer in models["peftkit"].base_model.tuner_layers():
        layer.delta_mode = "spectral"
    inputs = MODEL_FACTORIES["llama"].make_inputs()
    torch.testing.assert_close(output(models["peftkit"], inputs), output(models["peft"], inputs), atol=ATOL, rtol=0)


def test_second_adapter_in_subfolder_roundtrip(tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    inputs = tiny.make_inputs()
    for src_name, dst_name in DIRECTIONS:
        src = wrap(src_name, "llama")
        src.add_adapter("other", LIBS[src_name].FourierFTConfig(n_frequency=12, random_loc_seed=9, target_modules=["o_proj"]))
        src.set_adapter("other")
        expected = output(src, inputs)
        folder = tmp_path / src_name
        src.save_pretrained(str(folder))
        loaded = LIBS[dst_name].PeftModel.from_pretrained(tiny.make_model(), str(folder))
        loaded.load_adapter(str(folder / "other"), adapter_name="other")
        loaded.set_adapter("other")
        torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)

