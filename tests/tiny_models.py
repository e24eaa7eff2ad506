"""Factories for tiny transformers models and matching inputs, built from configs only.

initializer_range=0.2 (not 0.02) keeps activations large enough that an adapter visibly moves the
logits, so equality checks cannot pass vacuously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


@dataclass
class TinyCase:
    """A model factory, an input factory and the task type of one tiny architecture."""

    make_model: Callable[[], torch.nn.Module]
    make_inputs: Callable[[], dict]
    task_type: str
    targets: list  # a small explicit target list that exists in the model


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=1,
                        initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


def bert_seq_cls() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=3, initializer_range=0.2,
    )
    return BertForSequenceClassification(config).eval()


def t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        d_model=32, d_ff=48, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


def lm_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 7), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def cls_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 7), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}


def seq2seq_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 7), generator=generator)
    labels = torch.randint(2, VOCAB, (2, 5), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


MODEL_FACTORIES: dict[str, TinyCase] = {
    "llama": TinyCase(llama, lm_inputs, "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"]),
    "gpt2": TinyCase(gpt2, lm_inputs, "CAUSAL_LM", ["c_attn", "c_proj"]),
    "bert": TinyCase(bert_seq_cls, cls_inputs, "SEQ_CLS", ["query", "value", "dense"]),
    "t5": TinyCase(t5, seq2seq_inputs, "SEQ_2_SEQ_LM", ["q", "v", "wo"]),
}
