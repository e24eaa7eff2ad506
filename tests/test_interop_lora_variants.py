"""DoRA, PiSSA and OLoRA adapters move between Hugging Face peft and peftkit with the same logits.

DoRA: both libraries start from a non-trivial adapter (random A and B, magnitudes rescaled so that
`m != ||W + s B A||`), save it, and the other library loads it. PiSSA / OLoRA change the base
weight at init, so (as peft documents) an adapter is either loaded onto the original base with its
"pissa"/"olora" config -- the loader re-runs the deterministic init, then loads A and B -- or
converted to plain LoRA on save and loaded onto the untouched original base.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.test_lora_variants import CUSTOM  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft->peftkit", "peftkit->peft"]
ATOL = 1e-5
CASES = {
    "llama": (MODEL_FACTORIES["llama"], ["q_proj", "v_proj", "down_proj"]),
    "llama-embedding": (MODEL_FACTORIES["llama"], ["embed_tokens", "q_proj"]),
    "bert-seq-cls": (MODEL_FACTORIES["bert"], ["query", "value", "dense"]),
    "gpt2": (MODEL_FACTORIES["gpt2"], ["c_attn", "c_proj"]),
    "conv2d": (CUSTOM, ["conv", "head"]),
}


def wrap(lib_name: str, case, **config_kwargs):
    lib = LIBS[lib_name]
    config = lib.LoraConfig(r=4, lora_alpha=8, task_type=case.task_type, **config_kwargs)
    torch.manual_seed(1234)
    return lib.get_peft_model(case.make_model(), config).eval()


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@torch.no_grad()
def train_stand_in(model, seed: int = 5) -> None:
    """Move every trainable tensor (A, B, magnitudes, classifier copies) as training would."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.mul_(0.8 + 0.45 * torch.rand(param.shape, generator=generator))
        elif "lora_" in name or ".modules_to_save." in name:
            param.add_(0.3 * param.abs().mean() * torch.randn(param.shape, generator=generator))


def load(lib_name: str, case, path: str):
    model = LIBS[lib_name].PeftModel.from_pretrained(case.make_model(), path)
    return model.eval()


@pytest.mark.parametrize("source, target", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_dora_adapter_moves_between_libraries(case_name, source, target, tmp_path):
    case, targets = CASES[case_name]
    inputs = case.make_inputs()
    model = wrap(source, case, target_modules=targets, use_dora=True, init_lora_weights=False)
    train_stand_in(model)
    expected = logits(model, inputs)
    base = logits(case.make_model(), inputs)
    assert not torch.allclose(expected, base, atol=ATOL)
    model.save_pretrained(str(tmp_path))
    loaded = load(target, case, str(tmp_path))
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=0)
    loaded.merge_adapter()  # the other library's merge agrees too
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("source, target", DIRECTIONS, ids=DIRECTION_IDS)
# Not gpt2 + olora: peft 0.21's OLoRA ignores fan_in_fan_out, so its Conv1D adapters get the wrong shapes.
@pytest.mark.parametrize("case_name, init", [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")])
def test_base_weight_init_adapter_moves_between_libraries(case_name, init, source, target, tmp_path):
    """Same modified base on both sides: the loader re-runs the init on the original base."""
    case, targets = CASES[case_name]
    inputs = case.make_inputs()
    model = wrap(source, case, target_modules=targets, init_lora_weights=init)
    torch.testing.assert_close(logits(model, inputs), logits(case.make_model(), inputs), atol=ATOL, rtol=0)
    train_stand_in(model)
    expected = logits(model, inputs)
    model.save_pretrained(str(tmp_path))
    loaded = load(target, case, str(tmp_path))
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("source, target", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("init", ["pissa_niter_4", "olora"])
def test_converted_adapter_moves_between_libraries(init, source, target, tmp_path):
    """save_pretrained(..., path_initial_model_for_weight_conversion=...) -> plain LoRA on the original base."""
    case, targets = CASES["llama"]
    inputs = case.make_inputs()
    model = wrap(source, case, target_modules=targets, init_lora_weights=init)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(tmp_path / "initial"))
    model.peft_config["default"].init_lora_weights = init
    train_stand_in(model)
    expected = logits(model, inputs)
    model.save_pretrained(str(tmp_path / "lora"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    loaded = load(target, case, str(tmp_path / "lora"))
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].init_lora_weights is True
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=0)


def test_loraplus_groups_match_peft():
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    case = MODEL_FACTORIES["bert"]
    kwargs = dict(target_modules=["query", "value", "word_embeddings"], use_dora=True, init_lora_weights=False)
    groups = {}
    for lib_name, create in (("peft", peft_loraplus), ("peftkit", peftkit.create_loraplus_optimizer)):
        model = wrap(lib_name, case, **kwargs)
        optimizer = create(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=8, loraplus_weight_decay=0.01)
        names = {id(p): n for n, p in model.named_parameters()}
        groups[lib_name] = [
            (group["lr"], group["weight_decay"], sorted(names[id(p)] for p in group["params"]))
            for group in optimizer.param_groups
        ]
    assert groups["peft"] == groups["peftkit"]
    assert all(entries for _, _, entries in groups["peftkit"])  # every group is exercised


def test_dora_training_forward_with_dropout_matches_peft():
    """With active dropout both terms see the dropped input (peft's rule); outputs and gradients agree."""
    case, targets = CASES["llama"]
    inputs = case.make_inputs()
    results = {}
    for lib_name in LIBS:
        model = wrap(lib_name, case, target_modules=targets, use_dora=True, init_lora_weights=False, lora_dropout=0.3)
        train_stand_in(model)
        model.train()
        if lib_name == "peftkit":
            # peftkit draws stock dropout masks its own (cheaper) way; a hooked dropout module runs as
            # nn.Dropout itself, so both libraries draw the same masks from the same seed.
            for name, module in model.named_modules():
                if name.endswith("lora_dropout.default"):
                    module.register_forward_hook(lambda *_: None)
        torch.manual_seed(99)
        loss = model(**inputs).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "lora_magnitude_vector" in n or "lora_A" in n}
        results[lib_name] = (loss.detach(), grads)
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model(**inputs).loss, loss, atol=1e-4), "dropout had no effect"
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    assert results["peftkit"][1].keys() == results["peft"][1].keys()
    for name, grad in results["peft"][1].items():
        torch.testing.assert_close(results["peftkit"][1][name], grad, atol=1e-5, rtol=1e-4)
