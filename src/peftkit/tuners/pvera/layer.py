r"""PVeRA layers: VeRA whose middle vector is sampled, `z ~ N(mu, exp(logvar))`.

    h = lambda_d * (A[:2r, :in] dropout(x))            (2r,)  = [mu (r,), logvar (r,)]
    z = mu + eps * exp(logvar / 2),  eps ~ N(0, 1)     in training, or always with sample_at_inference
    z = mu                                             otherwise (eval)
    y = W x + lambda_b * (B[:out, :r] z)

Merging folds the mean: `delta_W = diag(lambda_b) B diag(lambda_d[:r]) A[:r]`. The noise comes
from the adapter's own CPU generator when `generator_seed` is set (reproducible; adding an adapter
does not disturb another's stream), else from the global RNG. Everything else -- the shared pair,
slicing, checkpoints -- is VeRA's (`vera.projection`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._core.base_layers import is_linear_like, wraps
from ..vera.projection import ProjectionLayer

SUPPORTED_LAYERS = "`torch.nn.Linear` (optionally quantized), `transformers.pytorch_utils.Conv1D`"


class PveraLayer(ProjectionLayer):
    """PVeRA on `nn.Linear`, transformers' `Conv1D` or a quantized linear layer."""

    adapter_layer_names = ("pvera_lambda_b", "pvera_lambda_d")
    other_param_names = ("pvera_A", "pvera_B", "pvera_dropout", "r", "sample_at_inference", "pvera_generator")
    shared_layer_names = ("pvera_A", "pvera_B")
    projection_names = ("pvera_A", "pvera_B")
    lambda_names = ("pvera_lambda_b", "pvera_lambda_d")
    dropout_name = "pvera_dropout"
    rows_per_rank = 2
    method_name = "PVeRA"

    def _add_method_state(
        self, adapter_name: str, sample_at_inference: bool = False, generator_seed: Optional[int] = None
    ) -> None:
        if "sample_at_inference" not in self.__dict__:
            self.sample_at_inference: dict[str, bool] = {}
            self.pvera_generator: dict[str, Optional[torch.Generator]] = {}
        self.sample_at_inference[adapter_name] = sample_at_inference
        # On CPU always: a generator is bound to its device and `.to()` does not move it.
        generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        self.pvera_generator[adapter_name] = generator

    def latent(self, hidden: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """mu, or a sample of N(mu, exp(logvar)) in training / with sample_at_inference."""
        mu, logvar = hidden.chunk(2, dim=-1)
        return self._reparametrize(mu, logvar, adapter_name)

    def _reparametrize(self, mu: torch.Tensor, logvar: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`mu + eps * exp(logvar / 2)` (peft's name); the mean alone in eval without sample_at_inference."""
        if not (self.training or self.sample_at_inference[adapter_name]):
            return mu
        std = torch.exp(0.5 * logvar)
        generator = self.pvera_generator[adapter_name]
        if generator is None:
            noise = torch.randn_like(std)
        else:
            noise = torch.randn(std.shape, dtype=std.dtype, generator=generator).to(std.device)
        return mu + noise * std

    def mean_rows(self, projection_a: torch.Tensor, lambda_d: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Merging uses the mean: the first half of A's rows and of lambda_d."""
        return projection_a[:r], lambda_d[:r]

    def reset_pvera_parameters(self, adapter_name: str, d_initial: float = 0.1) -> None:
        """lambda_b = 0, lambda_d = d_initial (peft's name): the adapter becomes a no-op."""
        self._reset_lambdas(adapter_name, d_initial)

    def __repr__(self) -> str:
        return "pvera." + super().__repr__()


#: peft's `Linear` (one class for dense, Conv1D and quantized bases).
Linear = PveraLayer

dispatch_linear = wraps(is_linear_like, PveraLayer)
