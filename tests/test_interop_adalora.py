"""AdaLoRA interoperability with Hugging Face peft (a test-only dependency): same config fields,
same checkpoint keys, shapes and JSON, the same rank allocation, and adapters -- pruned ones
included -- that load in either library with the same logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

# peft's own notices (fan_in_fan_out flipped for Conv1D, rank_pattern keys, zero-sized tensors, ...).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft->peftkit", "peftkit->peft"]
ATOL = 1e-5


def config_kwargs(model_name: str, **overrides) -> dict:
    case = MODEL_FACTORIES[model_name]
    kwargs = dict(
        init_r=4, target_r=2, lora_alpha=8, target_modules=list(case.targets), task_type=case.task_type,
        tinit=1, tfinal=2, deltaT=1, total_step=8,
    )
    kwargs.update(overrides)
    return kwargs


def wrap(lib_name: str, model_name: str, **overrides):
    lib = LIBS[lib_name]
    model = MODEL_FACTORIES[model_name].make_model()
    torch.manual_seed(1234)
    return lib.get_peft_model(model, lib.AdaLoraConfig(**config_kwargs(model_name, **overrides)))


def logits(model, model_name: str) -> torch.Tensor:
    """Eval-mode logits without labels (peft's AdaLoRA forward needs a trainable adapter when given labels)."""
    inputs = MODEL_FACTORIES[model_name].make_inputs()
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def train(model, model_name: str, steps: int, lr: float = 0.05) -> None:
    """AdamW steps with update_and_allocate, as in peft's documented loop."""
    inputs = MODEL_FACTORIES[model_name].make_inputs()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)  # BERT's dropout: both libraries then draw the same masks
    for step in range(steps):
        model(**inputs).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()


def copy_adapter(src_lib: str, src, dst_lib: str, dst) -> None:
    state = LIBS[src_lib].get_peft_model_state_dict(src)
    LIBS[dst_lib].set_peft_model_state_dict(dst, state)


def read_config(directory) -> dict:
    config = json.loads((directory / "adapter_config.json").read_text())
    config.pop("peft_version")
    config["target_modules"] = sorted(config["target_modules"])
    return config


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return out


def test_config_fields_and_defaults_match_peft():
    ours, theirs = _defaults(peftkit.AdaLoraConfig), _defaults(peft.AdaLoraConfig)
    assert sorted(ours) == sorted(theirs)
    differing = {k: (ours[k], theirs[k]) for k in ours if k not in ("peft_type", "runtime_config") and ours[k] != theirs[k]}
    assert ours["runtime_config"].ephemeral_gpu_offload is theirs["runtime_config"].ephemeral_gpu_offload is False
    assert not differing
    assert issubclass(peftkit.AdaLoraConfig, peftkit.LoraConfig)


@pytest.mark.parametrize("model_name", ["llama", "bert", "gpt2"])
def test_unpruned_checkpoints_match_and_load_both_ways(model_name, tmp_path):
    """Random A, E, B (init_lora_weights=False): same keys, shapes and config; logits agree across libraries."""
    models = {name: wrap(name, model_name, init_lora_weights=False) for name in LIBS}
    copy_adapter("peft", models["peft"], "peftkit", models["peftkit"])
    for name, model in models.items():
        model.save_pretrained(str(tmp_path / name))
    theirs, ours = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "peftkit" / "adapter_model.safetensors"
    )
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert any(key.endswith(".lora_E") for key in ours) and not any("ranknum" in key for key in ours)
    assert read_config(tmp_path / "peftkit") == read_config(tmp_path / "peft")
    expected = logits(models["peft"], model_name)
    assert (expected - logits(MODEL_FACTORIES[model_name].make_model(), model_name)).abs().max() > 1e-3
    assert_close(logits(models["peftkit"], model_name), expected)
    for writer in LIBS:
        for reader_name, reader in LIBS.items():
            loaded = reader.PeftModel.from_pretrained(MODEL_FACTORIES[model_name].make_model(), str(tmp_path / writer))
            assert_close(logits(loaded, model_name), expected)


@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_same_training_prunes_the_same_ranks(model_name, tmp_path):
    """From the same weights, the same steps give peft's rank_pattern, tensors and saved files."""
    models = {name: wrap(name, model_name) for name in LIBS}
    copy_adapter("peft", models["peft"], "peftkit", models["peftkit"])
    for model in models.values():
        train(model, model_name, steps=8)
    patterns = {
        name: {k.replace(".default", ""): v for k, v in model.peft_config["default"].rank_pattern.items()}
        for name, model in models.items()
    }
    assert patterns["peftkit"] == patterns["peft"]
    assert any(not all(mask) for mask in patterns["peft"].values()), "nothing was pruned; the test is vacuous"
    assert_close(logits(models["peftkit"], model_name), logits(models["peft"], model_name))
    for name, model in models.items():
        model.save_pretrained(str(tmp_path / name))
    assert read_config(tmp_path / "peftkit") == read_config(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "peftkit" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("model_name", ["llama", "bert", "gpt2"])
def test_pruned_adapter_loads_across_libraries(model_name, src_name, dst_name, tmp_path):
    """Train with pruning in one library, save, load in the other: same logits, resized modules."""
    src = wrap(src_name, model_name)
    train(src, model_name, steps=8)
    expected = logits(src, model_name)
    src.save_pretrained(str(tmp_path))
    rank_pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert any(not all(mask) for mask in rank_pattern.values()), "nothing was pruned; the test is vacuous"
    loaded = LIBS[dst_name].PeftModel.from_pretrained(MODEL_FACTORIES[model_name].make_model(), str(tmp_path))
    assert_close(logits(loaded, model_name), expected)
    in_file = load_file(tmp_path / "adapter_model.safetensors")
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS, ids=DIRECTION_IDS)
def test_fully_pruned_module_crosses_libraries(src_name, dst_name, tmp_path):
    """A hand-made rank_pattern with an all-False and an all-True mask (rank 0 and rank init_r)."""
    src = wrap(src_name, "llama", init_lora_weights=False)
    masks = {}
    for index, name in enumerate(n for n, m in src.base_model.model.named_modules() if hasattr(m, "lora_E")):
        masks[f"{name}.lora_E"] = [[False] * 4, [True] * 4, [True, False, False, True]][index % 3]
    if src_name == "peft":
        src.base_model.rankallocator.mask_using_rank_pattern(src.base_model.model, masks)
    else:
        src.base_model.rankallocator.mask_using_rank_pattern(masks)
    src.peft_config["default"].rank_pattern = masks
    expected = logits(src, "llama")
    src.save_pretrained(str(tmp_path))
    in_file = load_file(tmp_path / "adapter_model.safetensors")
    assert in_file["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape == (0, 32)
    loaded = LIBS[dst_name].PeftModel.from_pretrained(MODEL_FACTORIES["llama"].make_model(), str(tmp_path))
    assert_close(logits(loaded, "llama"), expected)


def test_training_loss_includes_peft_orthogonal_penalty():
    """With the same weights, the training-mode loss (task loss + orth penalty) equals peft's."""
    models = {name: wrap(name, "llama", init_lora_weights=False, orth_reg_weight=0.7) for name in LIBS}
    copy_adapter("peft", models["peft"], "peftkit", models["peftkit"])
    inputs = MODEL_FACTORIES["llama"].make_inputs()
    losses = {}
    for name, model in models.items():
        model.train()
        with torch.no_grad():
            losses[name] = model(**inputs).loss
    assert_close(losses["peftkit"], losses["peft"])


@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize(("model_name", "bias"), [("bert", "lora_only"), ("gpt2", "all")])
def test_trained_biases_cross_libraries(model_name, bias, src_name, dst_name, tmp_path):
    src = wrap(src_name, model_name, bias=bias)
    train(src, model_name, steps=8)
    expected = logits(src, model_name)
    src.save_pretrained(str(tmp_path))
    assert any(key.endswith(".bias") for key in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = LIBS[dst_name].PeftModel.from_pretrained(MODEL_FACTORIES[model_name].make_model(), str(tmp_path))
    assert_close(logits(loaded, model_name), expected)
