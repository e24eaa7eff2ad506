"""CorDA: the covariance-oriented decomposition by its formula, IPM and KPM as peft computes them (same
decomposition, factors and residual base), outputs kept at init, the cache and covariance files, the
conversion to plain LoRA, and checkpoints both ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from peftkit import ConfigError, CordaConfig, LoraConfig, PeftModel, get_peft_model, preprocess_corda
from tests.interop_helpers import base_copy, nudge_adapter
from tests.tiny_models import VOCAB, gpt2, llama

pytestmark = pytest.mark.filterwarnings(r"ignore:`init_lora_weights` is 'corda'")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def samples(n: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (1, 24), generator=generator) for _ in range(n)]  # batch 1, as peft expects


def runner(model):
    def run_model() -> None:
        for ids in samples():
            model(input_ids=ids)
    return run_model


def corda_config(lib, targets=TARGETS, **options):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                          corda_config=lib.tuners.lora.config.CordaConfig(**options))


def corda_model(lib, make=llama, targets=TARGETS, **options):
    import importlib

    base = make()
    config = corda_config(lib, targets, **options)
    importlib.import_module(f"{lib.__name__}.tuners.lora.corda").preprocess_corda(base, config, runner(base))
    return lib.get_peft_model(base, config)


def test_config_matches_peft_and_checks_the_method():
    pytest.importorskip("peft")
    from peft.tuners.lora.config import CordaConfig as TheirConfig

    assert {f.name: f.default for f in dataclasses.fields(CordaConfig)} == {
        f.name: f.default for f in dataclasses.fields(TheirConfig)}
    with pytest.raises(ConfigError, match="Invalid corda_method found: xpm"):
        CordaConfig(corda_method="xpm")
    with pytest.warns(UserWarning, match="Using default CorDA config"):
        assert LoraConfig(init_lora_weights="corda").corda_config == CordaConfig()
    saved = LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm")).to_dict()
    assert LoraConfig.from_dict(saved).corda_config.corda_method == "kpm"


def test_the_decomposition_reproduces_the_weight_and_ipm_keeps_the_largest_components():
    model = llama()
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="corda",
                        corda_config=CordaConfig(prune_temporary_fields=False))
    preprocess_corda(model, config, runner(model))
    layer = model.model.layers[0].self_attn.q_proj
    covariance = torch.zeros(32, 32)
    inputs = []
    handle = layer.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach().reshape(-1, 32)))
    runner(model)()
    handle.remove()
    for rows in inputs:
        rows = rows / rows.max().abs()
        covariance += rows.T @ rows
    torch.testing.assert_close(layer.covariance_matrix, covariance / len(inputs), atol=1e-5, rtol=1e-5)
    eigens = layer.eigens
    assert eigens.S_WC.shape == (4,) and torch.all(eigens.S_WC[:-1] >= eigens.S_WC[1:])
    # the kept components are those of the full decomposition W = U S V^T with V = (V'^T C'^-1)^T
    damped = layer.covariance_matrix + torch.eye(32) * layer.covariance_matrix.diag().mean() * 0.01
    _, singular, _ = torch.linalg.svd(layer.weight.detach() @ damped, full_matrices=False)
    torch.testing.assert_close(eigens.S_WC, singular[:4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_same_decomposition_factors_and_residual_as_peft_and_outputs_kept(method):
    peft = pytest.importorskip("peft")
    pytest.importorskip("attr", reason="peft's corda module imports attrs, which the test extra does not install")
    import peftkit

    ours, theirs = corda_model(peftkit, corda_method=method), corda_model(peft, corda_method=method)
    for name, param in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], param, atol=1e-5, rtol=1e-4, msg=name)
    inputs = {"input_ids": samples(1)[0]}
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, llama()(**inputs).logits, atol=1e-4, rtol=0)


def test_conv1d_layers_are_decomposed_in_out_in_layout():
    peft = pytest.importorskip("peft")
    pytest.importorskip("attr", reason="peft's corda module imports attrs, which the test extra does not install")
    import peftkit

    ours, theirs = corda_model(peftkit, gpt2, ["c_attn"]), corda_model(peft, gpt2, ["c_attn"])
    for name, param in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], param, atol=1e-5, rtol=1e-4, msg=name)


def test_cache_and_covariance_files_are_reused(tmp_path):
    cache, covariance = str(tmp_path / "c" / "cache.pt"), str(tmp_path / "c" / "cov.pt")
    first = llama()
    preprocess_corda(first, corda_config(__import__("peftkit"), cache_file=cache, covariance_file=covariance),
                     runner(first))
    assert set(torch.load(covariance, weights_only=True)) == {
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    calls = []
    again = llama()
    preprocess_corda(again, corda_config(__import__("peftkit"), cache_file=cache), lambda: calls.append(1))
    other_rank = llama()  # a new rank from the saved covariances, without running the model
    preprocess_corda(other_rank, LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="corda",
                                            corda_config=CordaConfig(covariance_file=covariance)),
                     lambda: calls.append(1))
    assert not calls
    layer, reference = again.model.layers[1].mlp.down_proj, first.model.layers[1].mlp.down_proj
    assert torch.equal(layer.eigens.U_WC, reference.eigens.U_WC)
    torch.testing.assert_close(other_rank.model.layers[1].mlp.down_proj.eigens.S_WC, reference.eigens.S_WC[:2])
    with pytest.raises(ValueError, match="run_model must be specified"):
        preprocess_corda(llama(), corda_config(__import__("peftkit")))


def test_refusals():
    with pytest.raises(ValueError, match="please run `preprocess_corda` first"):
        get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights="corda",
                                           corda_config=CordaConfig()))
    model = llama()
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="corda", corda_config=CordaConfig())
    preprocess_corda(model, config, runner(model))
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(ValueError, match="Matrix U size mismatch"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="corda",
                                         corda_config=CordaConfig()))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)  # the failed call changed nothing


def test_converted_to_plain_lora_it_works_on_the_original_base(tmp_path):
    import peftkit

    model = corda_model(peftkit)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(tmp_path / "init"))
    model.peft_config["default"].init_lora_weights = "corda"
    nudge_adapter(model)
    inputs = {"input_ids": samples(1)[0]}
    expected = model(**inputs).logits
    model.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain = PeftModel.from_pretrained(llama(), str(tmp_path / "plain"))
    torch.testing.assert_close(plain(**inputs).logits, expected, atol=1e-4, rtol=0)


def test_checkpoints_move_between_peft_and_peftkit_on_the_residual_base(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("attr", reason="peft's corda module imports attrs, which the test extra does not install")
    import peftkit

    inputs = {"input_ids": samples(1)[0]}
    for source, target in ((peftkit, peft), (peft, peftkit)):
        model = nudge_adapter(corda_model(source))
        folder = str(tmp_path / source.__name__)
        model.save_pretrained(folder)
        with torch.no_grad():
            expected = model(**inputs).logits
        plain = base_copy(model, llama)  # the residual base
        config = target.PeftConfig.from_pretrained(folder)
        config.init_lora_weights = True  # loading: the saved factors, not a new decomposition
        loaded = target.PeftModel.from_pretrained(plain, folder, config=config)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-5, rtol=0)
