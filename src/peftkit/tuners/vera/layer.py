r"""VeRA layers: a frozen random pair (A, B) shared by the whole model, two trained vectors per layer.

    y = W x + lambda_b * (B[:out, :r] (lambda_d * (A[:r, :in] dropout(x))))
    delta_W = diag(lambda_b) B diag(lambda_d) A                    (out x in; transposed for Conv1D)

`init_weights=True` starts lambda_b at 0 and lambda_d at `d_initial` (a no-op adapter). The
pair, its slicing and the checkpoint rules live in `projection.py` (shared with PVeRA).
"""

from __future__ import annotations

from .._core.base_layers import is_linear_like, wraps
from .projection import ProjectionLayer

SUPPORTED_LAYERS = "`torch.nn.Linear` (optionally quantized), `transformers.pytorch_utils.Conv1D`"


class VeraLayer(ProjectionLayer):
    """VeRA on `nn.Linear`, transformers' `Conv1D` or a quantized linear layer: `delta_W = diag(lambda_b) B diag(lambda_d) A`."""

    lora_convertible = True  # delta_W is additive: convert_to_lora applies

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("vera_A", "vera_B", "vera_dropout", "r")
    shared_layer_names = ("vera_A", "vera_B")
    projection_names = ("vera_A", "vera_B")
    lambda_names = ("vera_lambda_b", "vera_lambda_d")
    dropout_name = "vera_dropout"
    rows_per_rank = 1
    method_name = "VeRA"

    def reset_vera_parameters(self, adapter_name: str, d_initial: float = 0.1) -> None:
        """lambda_b = 0, lambda_d = d_initial (peft's name): the adapter becomes a no-op."""
        self._reset_lambdas(adapter_name, d_initial)

    def __repr__(self) -> str:
        return "vera." + super().__repr__()


#: peft's `Linear` (one class for dense, Conv1D and quantized bases).
Linear = VeraLayer

dispatch_linear = wraps(is_linear_like, VeraLayer)
