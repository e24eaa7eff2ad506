"""VB-LoRA checkpoints move between peft and peftkit: same keys, shapes, dtypes, config, logits.

peft is a test-only dependency; the module is skipped without it. The source adapter takes a few
optimizer steps first (logits and bank both move away from their init), so an adapter that is not
loaded, or loaded into the wrong place, changes the outputs and the test fails. The helpers here
are reused by the UniLoRA and RandLoRA interop tests.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import read_config, read_weights  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
ATOL = 1e-5

CASES = {
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "gpt2": ("gpt2", {"target_modules": ["c_attn", "c_proj"]}),
    "bert": ("bert", {"target_modules": ["query", "value"]}),
    "llama-topk": ("llama", {"target_modules": ["q_proj", "v_proj"], "save_only_topk_weights": True, "topk": 3}),
    "llama-topk1": ("llama", {"target_modules": ["q_proj"], "save_only_topk_weights": True, "topk": 1}),
    "llama-bias": ("llama", {"target_modules": ["q_proj", "v_proj"], "bias": "all"}),
}


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        result = model(**inputs)
    return result if isinstance(result, torch.Tensor) else result.logits


def train_a_little(model: nn.Module, inputs: dict, steps: int = 3, lr: float = 0.05) -> None:
    """A few AdamW steps: every trained tensor moves away from its init."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def check_roundtrip(src, dst_lib, make_model, inputs: dict, tmp_path) -> None:
    """`src` saved, loaded by `dst_lib`: same logits, and dst's state dict is the file."""
    expected = output(src, inputs)
    assert (expected - output(make_model(), inputs)).abs().max() > 1e-3, "vacuous adapter"
    src.save_pretrained(str(tmp_path))
    loaded = dst_lib.PeftModel.from_pretrained(make_model(), str(tmp_path))
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)
    loaded.merge_adapter()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)


def check_same_layout(models: dict, tmp_path) -> None:
    """Both libraries write the same keys, shapes, dtypes and adapter_config.json."""
    layouts, configs = {}, {}
    for lib_name, model in models.items():
        model.save_pretrained(str(tmp_path / lib_name))
        layouts[lib_name] = {k: (tuple(v.shape), v.dtype) for k, v in read_weights(tmp_path / lib_name).items()}
        configs[lib_name] = read_config(tmp_path / lib_name, comparable=True)
    assert layouts["peftkit"] == layouts["peft"]
    assert configs["peftkit"] == configs["peft"]


def wrap(lib_name: str, case: str, seed: int = 1234):
    model_name, overrides = CASES[case]
    tiny = MODEL_FACTORIES[model_name]
    kwargs = dict(r=4, num_vectors=12, vector_length=16, init_vector_bank_bound=0.3, task_type=tiny.task_type)
    kwargs.update(overrides)
    config = LIBS[lib_name].VBLoRAConfig(**kwargs)
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
def test_same_seed_gives_the_same_adapter(case):
    """peft's draw order (bank per wrapped module, then the logits) is kept: same seed, same tensors."""
    states = {lib: LIBS[lib].get_peft_model_state_dict(wrap(lib, case, seed=7)) for lib in LIBS}
    assert sorted(states["peft"]) == sorted(states["peftkit"])
    for key, tensor in states["peft"].items():
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=0, rtol=0, msg=key)


def test_second_adapter_in_subfolder_roundtrip(tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    inputs = tiny.make_inputs()
    for src_name, dst_name in DIRECTIONS:
        src = wrap(src_name, "llama")
        config = LIBS[src_name].VBLoRAConfig(r=2, num_vectors=6, vector_length=8, target_modules=["o_proj"],
                                             init_vector_bank_bound=0.5)
        src.add_adapter("other", config)
        src.set_adapter("other")
        expected = output(src, inputs)
        folder = tmp_path / src_name
        src.save_pretrained(str(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder / "other"))
        loaded = LIBS[dst_name].PeftModel.from_pretrained(tiny.make_model(), str(folder))
        loaded.load_adapter(str(folder / "other"), adapter_name="other")
        loaded.set_adapter("other")
        torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)
