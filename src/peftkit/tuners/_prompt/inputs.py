"""The one place where virtual tokens meet a model's inputs, for every task and for `generate`.

Prompt tuning / P-tuning put `n` learned embeddings before the input's:

    inputs_embeds = [prompt_1 .. prompt_n, embed(x_1) .. embed(x_T)]    attention mask: n ones + mask
    labels (causal LM) = [-100] * n + labels                             (the loss skips virtual tokens)

Prefix tuning (P-tuning v2) puts `n` learned keys and values before every layer's attention cache:
the input is unchanged, the mask gets n leading ones and explicit position ids move by n.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from transformers import DynamicCache, EncoderDecoderCache

from ...utils.hf_compat import get_cache, put_cache
from ...utils.other import shift_tokens_right
from ...utils.peft_types import TaskType


def batch_size_of(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("Pass input_ids or inputs_embeds; prompt learning needs the batch size.")


def with_leading_ones(mask: Optional[torch.Tensor], count: int) -> Optional[torch.Tensor]:
    """`mask` (batch, T) with `count` ones in front; None and non-2D masks pass unchanged."""
    if mask is None or not torch.is_tensor(mask) or mask.dim() != 2:
        return mask
    ones = torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device)
    return torch.cat((ones, mask), dim=1)


def prefix_cache(prefix: torch.Tensor, config: Any) -> Any:
    """Per-layer key/value prefixes as a transformers cache.

    `prefix` is (batch, n, num_layers * 2 * token_dim), laid out per virtual token as
    [layer 0 key, layer 0 value, layer 1 key, ...], each `num_attention_heads * head_dim` wide.
    Encoder-decoder models get the prefix in the decoder's self-attention (peft's layout: the
    table is repeated and cut in chunks of four), and an empty cross-attention cache.
    """
    batch, count = prefix.shape[:2]
    heads = config.num_attention_heads
    submodules = config.num_transformer_submodules
    rows = prefix.view(batch, count, config.num_layers * 2, heads, config.token_dim // heads)
    if submodules == 2:
        rows = torch.cat((rows, rows), dim=2)
    # (layers * 2 * submodules, batch, heads, n, head_dim), cut per layer.
    chunks = rows.permute(2, 0, 3, 1, 4).split(2 * submodules)
    self_attention = DynamicCache()
    for layer_idx, chunk in enumerate(chunks):
        self_attention.update(chunk[0], chunk[1], layer_idx)
    if submodules == 1:
        return self_attention
    return EncoderDecoderCache(self_attention, DynamicCache())


def prepare_forward_inputs(
    tuner: Any, adapter_name: str, kwargs: dict[str, Any], task_ids: Optional[torch.Tensor] = None
) -> dict[str, Any]:
    """The base model's keyword arguments for one forward pass with the adapter's virtual tokens
    (`task_ids`: each row's task, for methods whose prompt depends on it)."""
    config = tuner.peft_config[adapter_name]
    count = config.num_virtual_tokens
    batch = batch_size_of(kwargs)
    seq2seq = config.task_type == TaskType.SEQ_2_SEQ_LM
    if config.uses_kv_heads():  # prefix tuning, cartridges
        if seq2seq:
            kwargs["decoder_attention_mask"] = with_leading_ones(kwargs.get("decoder_attention_mask"), count)
        else:
            kwargs["attention_mask"] = with_leading_ones(kwargs.get("attention_mask"), count)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + count
        # The prefix is the cache (a head that takes none hands it to its backbone: PromptLearningModel.forward).
        prefix = tuner.prompt_table(adapter_name, batch, task_ids=task_ids)
        put_cache(kwargs, prefix_cache(prefix, config), tuner.model)
        return kwargs
    if kwargs.get("position_ids") is not None:
        warnings.warn("position_ids are not supported with prompt tuning / P-tuning; ignoring them.", stacklevel=4)
        kwargs["position_ids"] = None
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = tuner.word_embeddings()(kwargs["input_ids"])
    kwargs["input_ids"] = None
    table = tuner.prompt_table(adapter_name, batch, task_ids=task_ids)
    kwargs["inputs_embeds"] = torch.cat((table[:, :count].to(embeds.dtype), embeds), dim=1)
    kwargs["attention_mask"] = with_leading_ones(kwargs.get("attention_mask"), count)
    if seq2seq and tuner.prompts_the_decoder and config.num_transformer_submodules == 2:
        _prompt_the_decoder(tuner, kwargs, table[:, count:])
    if config.task_type == TaskType.CAUSAL_LM and kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        ignored = torch.full((batch, count), -100, dtype=labels.dtype, device=labels.device)
        kwargs["labels"] = torch.cat((ignored, labels), dim=1)
    if kwargs.get("token_type_ids") is not None and not seq2seq:
        token_types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat((token_types.new_zeros(batch, count), token_types), dim=1)
    return kwargs


def _prompt_the_decoder(tuner: Any, kwargs: dict[str, Any], prompts: torch.Tensor) -> None:
    """The table's second half before the decoder's input too (peft's layout for multitask prompt tuning):

        decoder_inputs_embeds = [prompt_n+1 .. prompt_2n, embed(y_0) .. embed(y_L-1)]   labels = [-100] * n + labels

    with `y` the decoder ids (from the labels, shifted right, when not given). Only when the call has
    decoder inputs or labels: `generate` prompts the encoder alone, as peft's does.
    """
    embeds = kwargs.pop("decoder_inputs_embeds", None)
    ids = kwargs.pop("decoder_input_ids", None)
    labels = kwargs.get("labels")
    if embeds is None and ids is None:
        if labels is None:
            return
        model_config = tuner.model.config
        ids = shift_tokens_right(labels, model_config.pad_token_id, model_config.decoder_start_token_id)
    if embeds is None:
        embeds = tuner.word_embeddings()(ids)
    count = prompts.shape[1]
    kwargs["decoder_inputs_embeds"] = torch.cat((prompts.to(embeds.dtype), embeds), dim=1)
    kwargs["decoder_attention_mask"] = with_leading_ones(kwargs.get("decoder_attention_mask"), count)
    if labels is not None:
        ignored = torch.full((labels.shape[0], count), -100, dtype=labels.dtype, device=labels.device)
        kwargs["labels"] = torch.cat((ignored, labels), dim=1)


def prepare_generation_step(
    tuner: Any, adapter_name: str, model_inputs: dict[str, Any], task_ids: Optional[torch.Tensor] = None
) -> dict[str, Any]:
    """Adjust one step's inputs of `generate`: virtual tokens on the first step, longer masks on every step."""
    config = tuner.peft_config[adapter_name]
    count = config.num_virtual_tokens
    cache = get_cache(model_inputs)
    first_step = cache is None or cache.get_seq_length() == 0
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        if first_step and config.uses_kv_heads():
            batch = model_inputs["decoder_input_ids"].shape[0]
            prefix = tuner.prompt_table(adapter_name, batch, task_ids=task_ids)
            put_cache(model_inputs, prefix_cache(prefix, config), tuner.model)
        return model_inputs
    model_inputs["attention_mask"] = with_leading_ones(model_inputs.get("attention_mask"), count)
    batch = batch_size_of(model_inputs)
    positions = model_inputs.get("cache_position")  # transformers < 5.4 passes it; it does not count virtual tokens
    if positions is not None:
        prepends = first_step and not config.uses_kv_heads()  # virtual tokens enter as embeddings now
        model_inputs["cache_position"] = (
            torch.arange(count + positions.numel(), device=positions.device) if prepends else positions + count
        )
    if config.uses_kv_heads():
        if model_inputs.get("position_ids") is not None:
            model_inputs["position_ids"] = model_inputs["position_ids"] + count
        if first_step:
            prefix = tuner.prompt_table(adapter_name, batch, task_ids=task_ids)
            put_cache(model_inputs, prefix_cache(prefix, config), tuner.model)
        return model_inputs
    model_inputs.pop("position_ids", None)  # positions follow the cache, virtual tokens included
    if first_step:
        embeds = model_inputs.get("inputs_embeds")
        if embeds is None:
            embeds = tuner.word_embeddings()(model_inputs["input_ids"])
        prompts = tuner.prompt_table(adapter_name, batch, task_ids=task_ids)[:, :count].to(embeds.dtype)
        model_inputs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        model_inputs["input_ids"] = None
    return model_inputs
