"""CPT (context-aware prompt tuning) on the tiny Llama: config, the epsilon-ball projection, the masked
gradient, the weighted loss by hand, training, generate, save -> load."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from peftkit import CPTConfig, ConfigError, PeftModel, get_peft_model
from peftkit.utils.peft_types import PeftType
from tests.properties import assert_close, assert_differs, check_generate_equals_greedy, output_of
from tests.tiny_models import llama, lm_inputs

#: Two examples of context: [in-template, input, out-template, output] x 2 (types 4i+1 .. 4i+4).
CONTEXT_IDS = [5, 6, 7, 8, 9, 10, 11, 12]
CONTEXT_TYPES = [1, 2, 3, 4, 5, 6, 7, 8]
#: The input: one more example, typed as the caller would (an output token at the end of each row).
INPUT_TYPES = torch.tensor([[1, 1, 2, 2, 3, 4, 4], [1, 2, 2, 3, 4, 0, 0]])
DIM = 32


def _config(**kwargs):
    fields = dict(task_type="CAUSAL_LM", cpt_token_ids=CONTEXT_IDS, cpt_tokens_type_mask=CONTEXT_TYPES)
    fields.update(kwargs)
    return CPTConfig(**fields)


def _model(**kwargs):
    torch.manual_seed(0)
    return get_peft_model(llama(), _config(**kwargs))


def _encoder(model):
    return model.base_model.prompt_encoder["default"]


def _inputs():
    return {**lm_inputs(), "input_type_mask": INPUT_TYPES.clone()}


def _train(model, steps=4, lr=1.0):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**_inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------- config
def test_config_defaults_are_peft_s_and_the_context_sets_the_size():
    config = CPTConfig(task_type="CAUSAL_LM")
    assert config.peft_type == PeftType.CPT and config.is_prompt_learning
    assert (config.cpt_token_ids, config.cpt_mask, config.cpt_tokens_type_mask) == ([0], [1], [1])
    assert (config.opt_weighted_loss_type, config.opt_loss_decay_factor) == ("none", 1.0)
    assert (config.opt_projection_epsilon, config.opt_projection_format_epsilon) == (0.1, 0.1)
    assert config.num_virtual_tokens == 1 and config.num_transformer_submodules == 1
    config = _config(num_virtual_tokens=3)
    assert config.num_virtual_tokens == len(CONTEXT_IDS) and config.cpt_mask == [1] * len(CONTEXT_IDS)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"task_type": "SEQ_CLS"}, "only supports task_type = CAUSAL_LM"),
        ({"task_type": None}, "only supports task_type"),
        ({"cpt_tokens_type_mask": [1, 2]}, "same length"),
        ({"cpt_mask": [1]}, "same length"),
        ({"cpt_token_ids": []}, "cpt_token_ids is empty"),
        ({"cpt_token_ids": [1, -2, 3, 4, 5, 6, 7, 8]}, "cpt_token_ids holds"),
        ({"cpt_token_ids": "hello"}, "list of integers"),
        ({"opt_weighted_loss_type": "linear"}, "opt_weighted_loss_type"),
        ({"opt_projection_epsilon": -0.1}, "radius"),
        ({"opt_loss_decay_factor": float("nan")}, "finite"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _config(**kwargs)


def test_shape_fields_always_come_from_the_model():
    model = get_peft_model(llama(), _config(token_dim=7, num_layers=9))
    config = model.peft_config["default"]
    assert (config.token_dim, config.num_layers, config.num_attention_heads) == (DIM, 2, 4)
    assert config.num_virtual_tokens == len(CONTEXT_IDS)


def test_context_ids_outside_the_vocabulary_are_refused():
    base = llama()
    with pytest.raises(ConfigError, match="input embedding has 96 rows"):
        get_peft_model(base, _config(cpt_token_ids=[5, 6, 7, 8, 9, 10, 11, 200]))
    assert not any("prompt_encoder" in name for name, _ in base.named_modules())


# ---------------------------------------------------------------------------------------------- the encoder
def test_the_prompt_starts_as_the_context_s_embeddings():
    model = _model()
    encoder = _encoder(model)
    context = llama().get_input_embeddings().weight[CONTEXT_IDS]
    assert torch.equal(encoder.embedding.weight, context)
    assert not encoder.delta_embedding.weight.any()
    inputs = lm_inputs()
    with torch.no_grad():
        embeds = torch.cat((context.expand(2, -1, -1), llama().get_input_embeddings()(inputs["input_ids"])), dim=1)
        expected = llama()(inputs_embeds=embeds).logits
    assert_close(output_of(model, inputs), expected)


def test_projection_keeps_each_delta_row_in_its_epsilon_ball():
    model = _model(opt_projection_epsilon=0.3, opt_projection_format_epsilon=0.05)
    encoder = _encoder(model)
    scale = math.sqrt(DIM / 2048)
    radius = {1: 0.05 * scale, 2: 0.3 * scale, 3: 0.05 * scale, 0: 1e-10}  # by type % 4
    torch.manual_seed(1)
    big = torch.randn(len(CONTEXT_IDS), DIM)
    small = big / big.norm(dim=1, keepdim=True) * 1e-12  # inside every ball: unchanged
    for start, expect_scaled in ((big, True), (small, False)):
        with torch.no_grad():
            encoder.delta_embedding.weight.copy_(start)
        output_of(model, lm_inputs())  # the forward projects the weight in place
        weight = encoder.delta_embedding.weight.detach()
        for row, kind in enumerate(t % 4 for t in CONTEXT_TYPES):
            limit = radius[kind]
            if expect_scaled:
                assert math.isclose(float(weight[row].norm()), limit, rel_tol=1e-5)
                # same direction, shorter
                assert torch.allclose(weight[row] / weight[row].norm(), start[row] / start[row].norm(), atol=1e-5)
            else:
                assert torch.equal(weight[row], start[row])


def test_only_template_and_input_rows_of_the_delta_train():
    model = _model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.prompt_encoder.default.delta_embedding.weight"}
    assert model.get_nb_trainable_parameters()[0] == len(CONTEXT_IDS) * DIM
    losses = _train(model)
    delta = _encoder(model).delta_embedding.weight.detach()
    moved = [bool(delta[row].any()) for row in range(len(CONTEXT_IDS))]
    assert moved == [t % 4 != 0 for t in CONTEXT_TYPES]  # labels (types 4, 8) never move
    assert torch.equal(_encoder(model).embedding.weight, llama().get_input_embeddings().weight[CONTEXT_IDS])
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------- the loss
def _loss_by_hand(logits, input_ids, input_types, decay=None):
    """Labels on [context, input] where the type is a positive multiple of 4, weighted per example."""
    shift = max(CONTEXT_TYPES)
    total = 0.0
    count = 0
    for row in range(input_ids.shape[0]):
        ids = CONTEXT_IDS + input_ids[row].tolist()
        types = CONTEXT_TYPES + [t + shift if t > 0 else 0 for t in input_types[row].tolist()]
        label_types = sorted({t for t in types if t > 0 and t % 4 == 0})
        for pos in range(1, len(ids)):
            if types[pos] > 0 and types[pos] % 4 == 0:
                later = sum(1 for t in label_types if t > types[pos])
                weight = decay ** later if decay is not None else 1.0
                total += weight * float(F.cross_entropy(logits[row, pos - 1], torch.tensor(ids[pos])))
                count += 1
    return total / count


@pytest.mark.parametrize("decay", [None, 0.5])
def test_loss_is_the_weighted_mean_over_context_and_input_labels(decay):
    kwargs = {"opt_weighted_loss_type": "decay", "opt_loss_decay_factor": decay} if decay else {}
    model = _model(**kwargs)
    _train(model, steps=2)
    model.eval()
    inputs = _inputs()
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (2, len(CONTEXT_IDS) + 7, 96)
    expected = _loss_by_hand(out.logits, inputs["input_ids"], INPUT_TYPES, decay)
    assert math.isclose(float(out.loss), expected, rel_tol=1e-5)
    assert torch.equal(inputs["input_type_mask"], INPUT_TYPES)  # the caller's mask is left as it was
    if decay:  # the weights matter: the plain mean differs
        assert not math.isclose(float(out.loss), _loss_by_hand(out.logits, inputs["input_ids"], INPUT_TYPES), rel_tol=1e-4)


def test_without_input_type_mask_every_input_token_is_typed_4():
    """peft's default: types 4 shifted past the context's largest type (8 -> 12, a label)."""
    model = _model()
    inputs = lm_inputs()
    with torch.no_grad():
        out = model(**inputs)
        typed = model(**inputs, input_type_mask=torch.full_like(inputs["input_ids"], 4))
    assert_close(out.loss, typed.loss)
    assert math.isclose(float(out.loss), _loss_by_hand(out.logits, inputs["input_ids"], torch.full((2, 7), 4)), rel_tol=1e-5)


def test_no_label_position_warns_and_gives_nan():
    model = _model(cpt_tokens_type_mask=[1, 2, 3, 1, 5, 6, 7, 5])  # no output in the context
    with pytest.warns(UserWarning, match="no position of this batch is a label"):
        with torch.no_grad():
            loss = model(**lm_inputs(), input_type_mask=torch.full((2, 7), 2)).loss  # 2 + 7 = 9: an input
    assert torch.isnan(loss)


def test_return_dict_false_gives_the_loss_first_and_no_labels_gives_no_loss():
    model = _model().eval()
    with torch.no_grad():
        out = model(**_inputs())
        as_tuple = model(**_inputs(), return_dict=False)
        unlabelled = model(input_ids=lm_inputs()["input_ids"])
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    assert out.to_tuple()[0] is out.loss
    assert unlabelled.loss is None and torch.equal(unlabelled.logits, out.logits)


# ---------------------------------------------------------------------------------------------- model-level
def test_disabled_adapter_is_the_base_model():
    model = _model()
    _train(model, steps=2)
    inputs = lm_inputs()
    with model.disable_adapter():
        with torch.no_grad():
            out = model(**inputs, input_type_mask=INPUT_TYPES)
        assert_close(out.logits, output_of(llama(), inputs))
        assert_close(out.loss, llama()(**inputs).loss)


def test_generate_equals_greedy_by_hand():
    model = _model()
    _train(model, steps=2)
    model.eval()
    check_generate_equals_greedy(model, torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]), max_new_tokens=3)


def test_save_holds_context_plus_projected_delta_and_reloads(tmp_path):
    model = _model()
    _train(model)
    model.eval()
    encoder = _encoder(model)
    expected = output_of(model, _inputs())
    assert_differs(expected, output_of(_model(), _inputs()))
    model.save_pretrained(tmp_path)
    from peftkit import load_peft_weights

    saved = load_peft_weights(str(tmp_path))
    assert list(saved) == ["prompt_embeddings"]
    assert torch.allclose(saved["prompt_embeddings"], encoder.embedding.weight + encoder.delta_embedding.weight)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert loaded.peft_config["default"].token_dim == DIM
    assert_close(output_of(loaded, _inputs()), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert_close(loaded(**_inputs()).loss, model(**_inputs()).loss)
