r"""MonteCLoRA: Monte Carlo low-rank adaptation (variational noise on LoRA's A while training).

Each MonteCLoRA adapter of a Linear layer (A: r x in) owns a `MontecloraSampler` with trained
variational parameters `std_prior` (r) and `expert_weights_prior` (N = num_samples). In a
training forward it draws N perturbations of A^T and a mixture over them:

    sigma   = exp(std_prior)                                   (r,)
    V       = diag(max(diag(diag(sigma) Z_W diag(sigma)), 1e-3)) Z_W ~ Wishart(df = r, I_r)
    E_n     = sample_scaler * Z_n V^(1/2)                       Z_n ~ N(0, 1)^(in x r), n = 1..N
    alpha   = exp(expert_weights_prior)
    w       = softmax(log alpha - mean(log alpha) + sqrt(c) * z) z ~ N(0, I_N),
              c_n = (1 - 2/N) / alpha_n + sum(1/alpha) / N^2   (a Gaussian stand-in for Dirichlet(alpha))
    A'^T    = sum_n w_n (A^T + E_n)
    y       = W x + s B A' dropout(x)

Outside training A' = A, so the adapter is plain LoRA there and merges as LoRA (`W + s B A`).
The variational loss (`LoraModel._get_monteclora_loss()`, to add to the task loss while training;
0 in eval mode), per sampler, averaged over samplers:

    kl_loss_weight * (KL(Dir(alpha) || Dir(prior)) + KL_Wishart(sigma) + KL_Gauss(V))
    + sum(w^2)  if use_entropy

Checkpoint keys are peft's: `<module>.lora_monteclora_sampler.{std_prior, expert_weights_prior,
gaussian_var_prior, expert_weights}` (the last two: the latest V and w, as buffers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Chi2

from ...errors import ConfigError

if TYPE_CHECKING:
    from .layer import LoraLayer


@dataclass
class MontecloraConfig:
    """MonteCLoRA settings (`LoraConfig.monteclora_config`).

    Args:
        num_samples: Monte Carlo samples N per training forward (the mixture's size).
        use_entropy: Add `sum(w^2)` of the mixture weights to the variational loss.
        dirichlet_prior: Concentration of the Dirichlet prior over the mixture weights.
        sample_scaler: Scale of the perturbations E_n (near 0: plain LoRA).
        kl_loss_weight: Weight of the KL terms of the variational loss.
        buffer_size: peft's number of pre-drawn noise samples; peftkit draws per forward and keeps
            the field for compatibility.
    """

    num_samples: int = field(default=8, metadata={"help": "Monte Carlo samples per forward"})
    use_entropy: bool = field(default=False, metadata={"help": "Entropy term on the mixture weights"})
    dirichlet_prior: float = field(default=0.1, metadata={"help": "Dirichlet prior concentration"})
    sample_scaler: float = field(default=1e-4, metadata={"help": "Scale of the perturbations"})
    kl_loss_weight: float = field(default=1e-5, metadata={"help": "Weight of the KL terms"})
    buffer_size: int = field(default=150, metadata={"help": "Pre-drawn samples (peft)"})

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ConfigError("`num_samples` must be greater than 0.")
        if self.dirichlet_prior <= 0:
            raise ConfigError("`dirichlet_prior` must be greater than 0.")
        if self.buffer_size <= 0:
            raise ConfigError("`buffer_size` must be greater than 0.")


def _wishart_sample(rank: int) -> torch.Tensor:
    """Z_W ~ Wishart(df = r, I_r) by Bartlett's decomposition: L L^T, L lower triangular with
    L_ii = sqrt(chi^2(r - i)) and N(0, 1) below the diagonal (fp32, on the CPU)."""
    lower = torch.diag(Chi2(torch.arange(rank, 0, -1, dtype=torch.float32)).sample().sqrt().clamp(min=1e-6))
    rows, cols = torch.tril_indices(rank, rank, offset=-1)
    lower[rows, cols] = torch.randn(rows.numel())
    return lower @ lower.T


class MontecloraSampler(nn.Module):
    """The variational parameters of one adapter and the sampling of (E_1..E_N, w); see the module docstring."""

    def __init__(self, in_features: int, out_features: int, config: MontecloraConfig,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # out = the rank r
        self.num_samples = config.num_samples
        self.use_entropy = config.use_entropy
        self.dirichlet_prior = float(config.dirichlet_prior)
        self.sample_scaler = float(config.sample_scaler)
        self.kl_loss_weight = float(config.kl_loss_weight)
        self.std_prior = nn.Parameter(torch.rand(out_features, dtype=dtype))
        self.expert_weights_prior = nn.Parameter(torch.rand(config.num_samples, dtype=dtype))
        self.register_buffer("gaussian_var_prior", torch.eye(out_features, dtype=dtype))
        self.register_buffer("expert_weights", torch.full((config.num_samples,), 1.0 / config.num_samples, dtype=dtype))
        # The latest draws with their graph (the buffers above hold detached copies, for saving).
        self._live_var: Optional[torch.Tensor] = None
        self._live_weights: Optional[torch.Tensor] = None

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E: (N, in, r), w: (N,)) for one training forward."""
        dtype, device, rank, count = self.std_prior.dtype, self.std_prior.device, self.out_features, self.num_samples
        with torch.no_grad():
            wishart = _wishart_sample(rank).to(device, dtype)
            gauss = torch.randn(count, self.in_features, rank, device=device, dtype=dtype)
            normal = torch.randn(count, device=device, dtype=dtype)
        sigma = torch.exp(self.std_prior)
        variances = torch.clamp((sigma[:, None] * wishart * sigma[None, :]).diagonal(), min=1e-3)
        var = torch.diag(variances)
        noise = self.sample_scaler * torch.nan_to_num(gauss * variances.float().sqrt().to(dtype), nan=1e-3)
        alpha = torch.clamp(torch.exp(self.expert_weights_prior), min=1e-6)
        log_alpha = torch.log(alpha)
        spread = (1 - 2 / count) / alpha + (1 / alpha).sum() / count**2
        spread = torch.clamp(spread, min=1e-6) + 1e-6
        weights = torch.softmax(log_alpha - log_alpha.mean() + spread.float().sqrt().to(dtype) * normal, dim=-1)
        self._live_var, self._live_weights = var, weights
        with torch.no_grad():
            self.gaussian_var_prior.copy_(var)
            self.expert_weights.copy_(weights)
        return noise, weights

    def get_variational_loss(self) -> tuple[Union[torch.Tensor, float], Union[torch.Tensor, float]]:
        """(kl_loss_weight * (KL_Dir + KL_Wishart + KL_Gauss), entropy term); (0.0, 0.0) in eval mode."""
        if not self.training:
            return 0.0, 0.0
        var = self._live_var if self._live_var is not None else self.gaussian_var_prior
        weights = self._live_weights if self._live_weights is not None else self.expert_weights
        rank, count = self.out_features, self.num_samples
        alpha = torch.exp(self.expert_weights_prior)
        prior = torch.full_like(alpha, self.dirichlet_prior)
        kl_dirichlet = (
            torch.lgamma(alpha.sum()) - torch.lgamma(prior.sum())
            + (torch.lgamma(alpha) - torch.lgamma(prior)).sum()
            + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum()
        )
        std_var = torch.exp(2 * self.std_prior)
        kl_wishart = 0.5 * (-torch.log(std_var).sum() * rank + std_var.sum() * rank - rank**2)
        diag = torch.clamp(var.diagonal(), min=1e-6)
        kl_gauss = count * 0.5 * (diag.sum() - torch.log(diag).sum() - rank)
        entropy = (weights**2).sum() if self.use_entropy else 0
        return self.kl_loss_weight * (kl_dirichlet + kl_wishart + kl_gauss), entropy

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.out_features}, num_samples={self.num_samples}"


class MontecloraVariant:
    """MonteCLoRA as a strategy object for a LoRA `Linear`: perturbed A while training, plain LoRA otherwise."""

    def __init__(self, config: MontecloraConfig) -> None:
        self.config = config

    def init(self, layer: "LoraLayer", adapter_name: str) -> None:
        if "lora_monteclora_sampler" not in layer._modules:
            layer.lora_monteclora_sampler = nn.ModuleDict({})
            layer.adapter_layer_names = tuple(layer.adapter_layer_names) + ("lora_monteclora_sampler",)
        weight_a = layer.lora_A[adapter_name].weight
        sampler = MontecloraSampler(layer.in_features, layer.r[adapter_name], self.config, dtype=weight_a.dtype)
        # With A on the meta device (low_cpu_mem_usage) the sampler stays where it was made: the checkpoint fills it.
        layer.lora_monteclora_sampler[adapter_name] = sampler if weight_a.is_meta else sampler.to(weight_a.device)

    @staticmethod
    def adapter_output(
        layer: "LoraLayer", x: torch.Tensor, adapter_name: str, base_output: Optional[torch.Tensor]
    ) -> torch.Tensor:
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = layer.apply_dropout(x.to(lora_a.weight.dtype), adapter_name)
        weight = lora_a.weight
        if layer.training:
            noise, weights = layer.lora_monteclora_sampler[adapter_name]()
            if torch.isnan(noise).any() or torch.isnan(weights).any():
                warnings.warn("Monteclora sampling produced NaNs, using base weights.", stacklevel=5)
            else:
                weight = torch.einsum("n,nij->ij", weights, weight.T + noise).T
        return lora_b(F.linear(x, weight)) * layer.scaling[adapter_name]
