"""CPT checkpoints move between peft and peftkit with the same logits and CPT loss; from equal seeds
the two train identically (projection, gradient mask and weighted loss alike).

peft is a test-only dependency; the module is skipped without it. Adapters are trained a few SGD steps
so the projected delta is non-zero (a fresh CPT prompt is the context's plain embeddings).
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import assert_same_tensors, make_model, output, read_config, read_weights  # noqa: E402
from tests.tiny_models import lm_inputs  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
CONTEXT = dict(cpt_token_ids=[5, 6, 7, 8, 9, 10, 11, 12], cpt_tokens_type_mask=[1, 2, 3, 4, 5, 6, 7, 8])
INPUT_TYPES = torch.tensor([[1, 1, 2, 2, 3, 4, 4], [1, 2, 2, 3, 4, 0, 0]])
CASES = {
    "plain": {},
    "decay": {"opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.6},
    "wide-balls": {"opt_projection_epsilon": 2.0, "opt_projection_format_epsilon": 1.0},
}


def inputs() -> dict:
    # peft shifts the caller's mask in place; a fresh copy per call keeps both libraries' inputs equal.
    return {**lm_inputs(), "input_type_mask": INPUT_TYPES.clone()}


def trained(lib_name: str, case: str, steps: int = 4):
    lib = LIBS[lib_name]
    torch.manual_seed(2)
    model = lib.get_peft_model(make_model("llama"), lib.CPTConfig(task_type="CAUSAL_LM", **CONTEXT, **CASES[case]))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0)
    losses = []
    for _ in range(steps):
        loss = model(**inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def _encoder(model):
    return model.base_model.prompt_encoder["default"] if isinstance(model, peftkit.PeftModel) else model.prompt_encoder["default"]


@pytest.mark.parametrize("case", list(CASES))
def test_equal_seeds_train_identically(tmp_path, case):
    (ours, our_losses), (theirs, their_losses) = trained("peftkit", case), trained("peft", case)
    assert our_losses == pytest.approx(their_losses, rel=1e-5)
    delta = _encoder(ours).delta_embedding.weight
    assert delta.abs().max() > 1e-4, "vacuous: the delta did not move"
    torch.testing.assert_close(delta, _encoder(theirs).delta_embedding.weight, atol=1e-6, rtol=0)
    with torch.no_grad():
        a, b = ours(**inputs()), theirs(**inputs())
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(str(tmp_path / "peftkit"))
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert_same_tensors(read_weights(str(tmp_path / "peftkit")), read_weights(str(tmp_path / "peft")), atol=1e-6)
    assert read_config(str(tmp_path / "peftkit"), comparable=True) == read_config(str(tmp_path / "peft"), comparable=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("src,dst", [("peft", "peftkit"), ("peftkit", "peft")])
def test_checkpoint_loads_with_the_same_logits_and_loss(tmp_path, case, src, dst):
    model, _ = trained(src, case)
    with torch.no_grad():
        expected = model(**inputs())
    fresh = LIBS[src].get_peft_model(make_model("llama"), LIBS[src].CPTConfig(task_type="CAUSAL_LM", **CONTEXT))
    assert (expected.logits - output(fresh, inputs())).abs().max() > 1e-3, "vacuous adapter"
    model.save_pretrained(str(tmp_path))
    loaded = LIBS[dst].PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
    with torch.no_grad():
        actual = loaded(**inputs())
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=0)
    assert_same_tensors(LIBS[dst].get_peft_model_state_dict(loaded), read_weights(str(tmp_path)))


def test_generate_gives_the_same_tokens(tmp_path):
    reference, _ = trained("peft", "wide-balls")
    reference.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(make_model("llama"), str(tmp_path))
    ids = torch.tensor([[0, 5, 6, 7], [3, 4, 5, 6]])
    kwargs = dict(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), max_new_tokens=4,
                  do_sample=False, pad_token_id=0)
    for model in (loaded, reference):
        model.generation_config.eos_token_id = None
    assert torch.equal(loaded.generate(**kwargs), reference.generate(**kwargs))
