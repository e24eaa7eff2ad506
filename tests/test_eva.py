"""EVA: the config, the incremental PCA against a full SVD, the rank redistribution by explained
variance, the same state dict and adapter as peft on the same model and data, and the saved adapter
moving to peft and back."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftkit import (
    EvaConfig,
    LoraConfig,
    PeftModel,
    get_eva_state_dict,
    get_peft_model,
    initialize_lora_eva_weights,
)
from peftkit.tuners.lora.eva import (
    IncrementalPCA,
    minimal_target_modules,
    prepare_model_inputs_fn_language_modeling,
)
from tests.properties import training_losses
from tests.tiny_models import VOCAB, llama

pytestmark = [pytest.mark.filterwarnings(r"ignore:`init_lora_weights` is 'eva'"),
              pytest.mark.filterwarnings(r"ignore:lora with eva initialization used with low_cpu_mem_usage=False")]
TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def lm_batches(n: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, 16), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 12:] = 0
        labels = ids.clone()
        labels[1, :3] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def eva_model(lib, **eva) -> nn.Module:
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                            eva_config=lib.EvaConfig(**eva) if eva else None)
    return lib.get_peft_model(llama(), config)


# ---------------------------------------------------------------------------------------------- config
def test_config_fields_defaults_and_checks_match_peft():
    peft = pytest.importorskip("peft")
    assert {f.name: f.default for f in dataclasses.fields(EvaConfig)} == {
        f.name: f.default for f in dataclasses.fields(peft.EvaConfig)}
    with pytest.raises(ValueError, match="`rho` must be >= 1.0"):
        EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="`tau` must be between 0.0 and 1.0"):
        EvaConfig(tau=1.5)
    with pytest.warns(UserWarning, match="Using default EVA config"):
        assert LoraConfig(init_lora_weights="eva").eva_config == EvaConfig()
    with pytest.warns(UserWarning, match="`eva_config` specified but will be ignored"):
        LoraConfig(eva_config=EvaConfig())
    saved = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=1.5)).to_dict()
    assert saved["eva_config"]["rho"] == 1.5
    assert LoraConfig.from_dict(saved).eva_config == EvaConfig(rho=1.5)


# ------------------------------------------------------------------------------------------- the math
def test_incremental_pca_matches_scikit_learns_and_a_full_svd_on_low_rank_data():
    sklearn_decomposition = pytest.importorskip("sklearn.decomposition")
    torch.manual_seed(0)
    data = torch.randn(300, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64) + 3.0
    ours = IncrementalPCA(n_components=4, lowrank=False)
    theirs = sklearn_decomposition.IncrementalPCA(n_components=4)
    for chunk in data.split(100):
        ours.partial_fit(chunk)
        theirs.partial_fit(chunk.numpy())
    torch.testing.assert_close(ours.components_.abs(), torch.from_numpy(theirs.components_).abs(), atol=1e-8, rtol=0)
    torch.testing.assert_close(ours.singular_values_, torch.from_numpy(theirs.singular_values_), atol=1e-8, rtol=0)
    torch.testing.assert_close(ours.explained_variance_ratio_, torch.from_numpy(theirs.explained_variance_ratio_),
                               atol=1e-10, rtol=0)
    # on data of rank 4 (plus tiny noise), the incremental fit is the full PCA
    low_rank = torch.randn(300, 4) @ torch.randn(4, 12) + 1e-4 * torch.randn(300, 12)
    pca = IncrementalPCA(n_components=4, lowrank=False)
    for chunk in low_rank.split(100):
        pca.partial_fit(chunk)
    _, _, vh = torch.linalg.svd(low_rank - low_rank.mean(dim=0), full_matrices=False)
    assert torch.all(torch.nn.functional.cosine_similarity(pca.components_.float(), vh[:4]).abs() > 0.9999)


class TwoInputs(nn.Module):
    """lin_a sees an isotropic 16-d input, lin_b one that lives in 2 of its 16 dimensions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin_a = nn.Linear(16, 8)
        self.lin_b = nn.Linear(16, 8)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin_a(a) + self.lin_b(b)


def two_input_batches(n: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    basis = torch.randn(2, 16, generator=generator)
    return [{"a": torch.randn(64, 16, generator=generator), "b": torch.randn(64, 2, generator=generator) @ basis}
            for _ in range(n)]


def _forward(model, inputs):
    return model(**inputs)


def test_ranks_go_where_the_variance_is_and_alphas_keep_the_scaling():
    model = get_peft_model(TwoInputs(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin_a", "lin_b"],
                                                   init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.9)))
    batches = two_input_batches()
    initialize_lora_eva_weights(model, batches, forward_fn=_forward, prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    config = model.peft_config["default"]
    # budget 2 * 4 = 8 components; b's input has two directions (ratio ~0.5 each), a's sixteen (~1/16 each)
    assert config.rank_pattern == {"lin_a": 6, "lin_b": 2}
    assert config.alpha_pattern == {"lin_a": 8 * 6 / 4, "lin_b": 8 * 2 / 4}
    lin_a, lin_b = model.base_model.model.lin_a, model.base_model.model.lin_b
    assert lin_a.lora_A["default"].weight.shape == (6, 16) and lin_b.lora_A["default"].weight.shape == (2, 16)
    assert lin_a.scaling["default"] == lin_b.scaling["default"] == 2.0
    # b's A spans its input's plane: each row is (numerically) a combination of the two basis directions
    basis = torch.linalg.qr(torch.cat([batch["b"] for batch in batches])[:2].T)[0]
    rows = lin_b.lora_A["default"].weight.detach()
    torch.testing.assert_close(rows @ basis @ basis.T, rows, atol=1e-4, rtol=0)
    assert torch.all(lin_b.lora_B["default"].weight == 0)  # still a no-op until trained


def test_label_and_padding_mask_select_the_tokens():
    batch = lm_batches(1)[0]
    config = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig())
    rows = prepare_model_inputs_fn_language_modeling(batch, config)
    expected = (batch["attention_mask"].bool() & (batch["labels"] != -100)).nonzero()
    assert torch.equal(rows, expected) and rows.shape[0] == 64 - 4 - 3
    config.eva_config.use_label_mask = False
    assert prepare_model_inputs_fn_language_modeling(batch, config).shape[0] == 64 - 4


def test_minimal_target_modules_names_every_target_and_nothing_else():
    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    others = ["model", "model.layers.0.mlp.proj", "model.layers.0.self_attn"]
    assert minimal_target_modules(targets, others) == ["q_proj", "v_proj"]
    assert minimal_target_modules(["a.proj", "b.x"], ["c.proj"]) == ["a.proj", "x"]


def test_refusals():
    plain = get_peft_model(llama(), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="can only be used with `init_lora_weights='eva'`"):
        initialize_lora_eva_weights(plain, lm_batches())
    model = eva_model(__import__("peftkit"))
    with pytest.raises(ValueError, match="dataloader is required"):
        initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="dataloader is empty"):
        initialize_lora_eva_weights(model, [])
    with pytest.raises(ValueError, match="peft_config is required"):
        get_eva_state_dict(llama(), lm_batches())
    with pytest.raises(ValueError, match="model must be a PeftModel"):
        initialize_lora_eva_weights(llama(), lm_batches())


# --------------------------------------------------------------------------------------------- vs peft
def test_same_state_dict_adapter_and_saved_config_as_peft(tmp_path):
    peft = pytest.importorskip("peft")
    import peftkit

    batches = lm_batches()
    states, models = {}, {}
    for name, lib in (("peft", peft), ("peftkit", peftkit)):
        model = eva_model(lib, tau=0.9)
        states[name] = lib.get_eva_state_dict(model, batches, show_progress_bar=False)
        lib.initialize_lora_eva_weights(model, eva_state_dict=dict(states[name]))
        models[name] = model
    assert set(states["peft"]) == set(states["peftkit"])
    for key, theirs in states["peft"].items():
        assert states["peftkit"][key].shape == theirs.shape, key
        torch.testing.assert_close(states["peftkit"][key].float(), theirs.float(), atol=1e-4, rtol=0)
    ours_config, their_config = models["peftkit"].peft_config["default"], models["peft"].peft_config["default"]
    assert ours_config.rank_pattern == their_config.rank_pattern
    assert ours_config.alpha_pattern == their_config.alpha_pattern
    assert set(ours_config.target_modules) == set(their_config.target_modules)

    # train B a little so the adapter does something, then ours -> peft and peft -> ours
    inputs = batches[0]
    for model in models.values():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        model.save_pretrained(str(tmp_path / ("from_" + ("ours" if model is models["peftkit"] else "theirs"))))
    ours_out = models["peftkit"](**inputs).logits
    loaded_in_peft = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "from_ours"))
    torch.testing.assert_close(loaded_in_peft(**inputs).logits, ours_out, atol=1e-5, rtol=0)
    loaded_in_ours = PeftModel.from_pretrained(llama(), str(tmp_path / "from_theirs"))
    torch.testing.assert_close(loaded_in_ours(**inputs).logits, models["peft"](**inputs).logits, atol=1e-5, rtol=0)


def test_an_eva_adapter_trains_only_its_parameters_and_lowers_the_loss():
    import peftkit

    model = eva_model(peftkit, tau=0.9)
    batches = lm_batches()
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = training_losses(model, batches[:2], steps=12)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_low_cpu_mem_usage_creates_the_eva_adapter_where_the_data_decides(recwarn):
    """With low_cpu_mem_usage the factors start on the meta device; EVA materialises them with their ranks."""
    import peftkit

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(tau=0.9))
    with pytest.warns(UserWarning, match="low_cpu_mem_usage=False"):
        get_peft_model(llama(), config)
    model = get_peft_model(llama(), config, low_cpu_mem_usage=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.is_meta
    initialize_lora_eva_weights(model, lm_batches(), show_progress_bar=False)
    reference = eva_model(peftkit, tau=0.9)
    initialize_lora_eva_weights(reference, lm_batches(), show_progress_bar=False)
    assert not any(p.is_meta for p in model.parameters())
    assert model.peft_config["default"].rank_pattern == reference.peft_config["default"].rank_pattern
    torch.testing.assert_close(layer.lora_A["default"].weight,
                               reference.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight)
