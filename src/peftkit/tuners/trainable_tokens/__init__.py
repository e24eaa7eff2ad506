r"""Trainable Tokens: train only some rows (tokens) of an embedding; the rows are replaced, not offset.

    W'[i] <- T_a[k]   for the k-th index i of adapter a's `token_indices`,   W'[i] = W[i] otherwise

    (equivalently W'[i] = W[i] + delta with delta = T_a[k] - W[i]; `trainable_tokens_delta` holds T_a itself)

`T_a` starts as a copy of the rows (`init_weights=True`: a no-op) or random; merging writes the rows
into the embedding, unmerging writes the saved originals back. Under `tie_word_embeddings` an output
layer tied to the embedding uses the same rows. The layer is shared with LoRA's
`trainable_token_indices` (`tuners/_core/trainable_tokens.py`).
"""

from ...registry import MERGE, MethodSpec
from ...utils.peft_types import PeftType
from .._core.trainable_tokens import TrainableTokensLayer
from .config import TrainableTokensConfig
from .model import TrainableTokensModel

METHOD = MethodSpec(
    peft_type=PeftType.TRAINABLE_TOKENS,
    config_cls=TrainableTokensConfig,
    tuner_cls=TrainableTokensModel,
    cli_names=("trainable_tokens",),
    capabilities={MERGE},
)

__all__ = ["METHOD", "TrainableTokensConfig", "TrainableTokensLayer", "TrainableTokensModel"]
