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


# ====================================================================== VeLoRA, BD-LoRA, MonteCLoRA, KaSA
def variant_kwargs(lib_name: str, variant: str) -> dict:
    lib = LIBS[lib_name]
    bd_config = lib.tuners.lora.config.BdLoraConfig
    return {
        "velora": {"velora_config": lib.VeloraConfig(num_groups=4, init_type="batch_average")},
        "bdlora": {"use_bdlora": bd_config(target_modules_bd_a=["down_proj"], target_modules_bd_b=["q_proj", "v_proj"],
                                           nblocks=2)},
        "monteclora": {"monteclora_config": lib.MontecloraConfig(num_samples=3)},
        "kasa": {"kasa_config": lib.KasaConfig(beta=0.01, gamma=0.02)},
    }[variant]


VARIANTS = ["velora", "bdlora", "monteclora", "kasa"]


def wrap_variant(lib_name: str, variant: str, inputs: dict):
    case, targets = CASES["llama"]
    model = wrap(lib_name, case, target_modules=targets, init_lora_weights=False, **variant_kwargs(lib_name, variant))
    if variant == "velora":  # one training forward sets VeLoRA's projection vectors (saved buffers)
        model.train()
        model(**inputs).loss.backward()
        model.eval()
    train_stand_in(model)
    return model


@pytest.mark.parametrize("source, target", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_adapter_moves_between_libraries(variant, source, target, tmp_path):
    case, _ = CASES["llama"]
    inputs = case.make_inputs()
    model = wrap_variant(source, variant, inputs)
    expected = logits(model, inputs)
    assert not torch.allclose(expected, logits(case.make_model(), inputs), atol=ATOL)
    model.save_pretrained(str(tmp_path))
    loaded = load(target, case, str(tmp_path))
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=0)
    loaded.merge_adapter()  # the other library merges it the same way
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_checkpoints_have_peft_keys_shapes_and_config(variant, tmp_path):
    from tests.interop_helpers import read_config, read_weights

    inputs = CASES["llama"][0].make_inputs()
    for lib_name in LIBS:
        wrap_variant(lib_name, variant, inputs).save_pretrained(str(tmp_path / lib_name))
    weights = {lib_name: read_weights(str(tmp_path / lib_name)) for lib_name in LIBS}
    assert {k: v.shape for k, v in weights["peftkit"].items()} == {k: v.shape for k, v in weights["peft"].items()}
    assert read_config(str(tmp_path / "peftkit"), comparable=True) == read_config(str(tmp_path / "peft"), comparable=True)


def test_velora_training_step_matches_peft():
    """Same adapter, same batch: the same projection vectors and the same (approximate) gradients."""
    case, _ = CASES["llama"]
    inputs = case.make_inputs()
    results = {}
    for lib_name in LIBS:
        model = wrap(lib_name, case, target_modules=CASES["llama"][1], init_lora_weights=False,
                     **variant_kwargs(lib_name, "velora"))
        model.train()
        loss = model(**inputs).loss
        loss.backward()
        results[lib_name] = (
            loss.detach(),
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in model.named_buffers() if "lora_velora_embed" in n},
        )
    (loss_a, grads_a, embeds_a), (loss_b, grads_b, embeds_b) = results["peft"], results["peftkit"]
    torch.testing.assert_close(loss_b, loss_a, atol=ATOL, rtol=0)
    assert embeds_a.keys() == embeds_b.keys() and embeds_a
    for name in embeds_a:
        torch.testing.assert_close(embeds_b[name], embeds_a[name], atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)


def test_kasa_truncation_and_loss_match_peft(tmp_path):
    case, targets = CASES["llama"]
    inputs = case.make_inputs()
    models = {lib_name: wrap_variant(lib_name, "kasa", inputs) for lib_name in LIBS}
    bases = {
        lib_name: {n: p for n, p in model.named_parameters() if "base_layer.weight" in n}
        for lib_name, model in models.items()
    }
    assert bases["peft"].keys() == bases["peftkit"].keys() and bases["peft"]
    for name, weight in bases["peft"].items():
        torch.testing.assert_close(bases["peftkit"][name], weight, atol=1e-5, rtol=0)
    models["peft"].save_pretrained(str(tmp_path))
    loaded = load("peftkit", case, str(tmp_path))
    expected = models["peft"].base_model._get_kasa_loss()
    torch.testing.assert_close(loaded.base_model._get_kasa_loss(), expected, atol=1e-6, rtol=1e-5)


def test_monteclora_variational_loss_matches_peft(tmp_path):
    case, _ = CASES["llama"]
    inputs = case.make_inputs()
    model = wrap_variant("peft", "monteclora", inputs)
    model.save_pretrained(str(tmp_path))
    loaded = load("peftkit", case, str(tmp_path))
    model.train()
    loaded.train()
    expected = model.base_model._get_monteclora_loss()
    assert float(expected) != 0.0
    torch.testing.assert_close(loaded.base_model._get_monteclora_loss(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_variant_adapter_loads_with_low_cpu_mem_usage(variant, tmp_path):
    case, _ = CASES["llama"]
    inputs = case.make_inputs()
    model = wrap_variant("peft", variant, inputs)
    expected = logits(model, inputs)
    model.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(case.make_model(), str(tmp_path), low_cpu_mem_usage=True).eval()
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=0)
