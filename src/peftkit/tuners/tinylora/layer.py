r"""TinyLoRA layers: a frozen base layer plus `B R A x`, with R mixed from a tiny trainable vector.

    W  (out, in)  ~  U S Vh                         truncated SVD of the frozen base weight, rank r
    A = sqrt(S) Vh[:r]          (r, in)     frozen   saved as `...tinylora_A`
    B = U[:, :r] sqrt(S)        (out, r)    frozen   saved as `...tinylora_B`
    P  ~ N(0, 1/r)              (u, r, r)   frozen   saved as `...tinylora_P` (or regenerated from the seed)
    v                           (u,)        trained  saved once per group as `base_model.tinylora_v.<group>`

    R = sum_i v[i] P[i]         (r, r)
    y = W x + B R A dropout(x)                  (Linear / Conv1D)
    y = E[ids] + dropout(B[ids]) R A            (Embedding; B's rows are looked up)
    delta_W = B R A                             (transposed for Conv1D, which stores W as (in, out))

v starts at zeros (`init_weights=True`), so a fresh adapter is a no-op. Several targets may share
one v (`weight_tying`): the tuner owns the vectors and each layer holds its adapter's dict of them
(the same `ParameterDict` object everywhere) plus the key of its own group.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...quantization.weights import is_quantized
from .._core.base_layers import is_transposed, wraps
from .._core.layer import BaseTunerLayer


class AdapterBuffers(nn.Module):
    """Frozen per-adapter tensors registered as buffers, keyed by adapter name (peft's `BufferDict`).

    `persistent` decides whether they appear in `state_dict()` (TinyLoRA's P does only when saved).
    """

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self.persistent = persistent

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def items(self):
        return self._buffers.items()

    def set_persistent(self, persistent: bool) -> None:
        """Make every buffer (and the ones added later) persistent or not."""
        self.persistent = persistent
        if persistent:
            self._non_persistent_buffers_set.clear()
        else:
            self._non_persistent_buffers_set.update(self._buffers)


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with `B A` the best rank-r approximation of `weight` (out, in), S split evenly.

    Computed in float32; the factors are rounded to the weight's dtype before the square root is
    applied (peft's order of operations, so both libraries build identical factors).
    """
    dtype = weight.dtype
    u_full, s_full, vh_full = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    rank = min(r, *weight.shape)
    u_r, s_r, vh_r = u_full[:, :rank].to(dtype), s_full[:rank].to(dtype), vh_full[:rank].to(dtype)
    root = torch.sqrt(s_r)
    return (root.unsqueeze(1) * vh_r).contiguous(), (u_r * root.unsqueeze(0)).contiguous()


def projection(u: int, r: int, seed: int) -> torch.Tensor:
    """The fixed (u, r, r) projections P ~ N(0, 1/r), drawn on the CPU from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0 / (r**0.5), size=(u, r, r), generator=generator)


class TinyLoraLayer(BaseTunerLayer, nn.Module):
    """What every TinyLoRA layer shares: frozen A, B, P per adapter, R mixed from the (shared) v."""

    lora_convertible = True  # delta_W is additive: convert_to_lora applies

    adapter_layer_names = ("tinylora_v",)
    other_param_names = ("tinylora_A", "tinylora_B", "tinylora_P", "tinylora_dropout", "r", "u", "_tinylora_v_key")

    def __init__(self, base_layer: nn.Module, adapter_name: str, layer_idx: int = 0, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self._layer_idx = layer_idx  # the module's number among the targets: its projection seed offset
        # adapter name -> that adapter's vectors (group key -> v); the dicts are the tuner's own.
        self.tinylora_v = nn.ModuleDict({})
        self._tinylora_v_key: dict[str, str] = {}
        self.tinylora_A = AdapterBuffers()
        self.tinylora_B = AdapterBuffers()
        self.tinylora_P = AdapterBuffers()
        self.tinylora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.u: dict[str, int] = {}
        self._init_geometry(self.get_base_layer())
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    def _init_geometry(self, base: nn.Module) -> None:
        raise NotImplementedError

    def _dense_weight(self) -> torch.Tensor:
        """The base weight as (rows of B, columns of A): (out, in), or the (num, dim) embedding table."""
        return self.get_base_layer().weight

    def update_layer(
        self,
        adapter_name: str,
        vectors: nn.ParameterDict,
        v_key: str,
        r: int,
        u: int,
        projection_seed: int,
        save_projection: bool,
        tinylora_dropout: float = 0.0,
    ) -> None:
        """Add adapter `adapter_name`: the SVD factors of the base weight, P from the seed, and v."""
        for name, value in (("r", r), ("u", u)):
            if value <= 0:
                raise ValueError(f"`{name}` should be a positive integer value but the value passed is {value}")
        base_weight = self._dense_weight()
        A, B = svd_factors(base_weight, r)
        rank = A.shape[0]
        self.r[adapter_name], self.u[adapter_name] = rank, u
        self.tinylora_A[adapter_name], self.tinylora_B[adapter_name] = A, B
        # Rounded through the base dtype as peft does, so a regenerated P equals a saved one.
        self.tinylora_P.set_persistent(save_projection)
        self.tinylora_P[adapter_name] = projection(u, rank, projection_seed + self._layer_idx).to(base_weight.dtype)
        self.tinylora_dropout[adapter_name] = nn.Dropout(tinylora_dropout) if tinylora_dropout > 0 else nn.Identity()
        self.tinylora_v[adapter_name] = vectors
        self._tinylora_v_key[adapter_name] = v_key
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        """As the core's, for A, B and P (buffers) too: base device, adapter dtype."""
        super()._move_adapter_to_base(adapter_name, keep_fp32)
        if adapter_name not in self.tinylora_v:
            return
        vector = self.vector(adapter_name)
        for buffers in (self.tinylora_A, self.tinylora_B, self.tinylora_P):
            if adapter_name in buffers:
                device = buffers[adapter_name].device if vector.is_meta else vector.device
                buffers[adapter_name] = buffers[adapter_name].to(device, vector.dtype)

    # ------------------------------------------------------------------ adapter tensors
    def vector(self, adapter_name: str) -> nn.Parameter:
        """This layer's v of `adapter_name` (possibly shared with other layers)."""
        return self.tinylora_v[adapter_name][self._tinylora_v_key[adapter_name]]

    def mixing_matrix(self, adapter_name: str) -> torch.Tensor:
        """R = sum_i v[i] P[i], (r, r)."""
        vector = self.vector(adapter_name)
        return torch.einsum("i,ijk->jk", vector, self.tinylora_P[adapter_name].to(vector.dtype))

    def adapter_params(self, adapter_names: Optional[Any] = None) -> Iterator[nn.Parameter]:
        """This layer's own v per adapter (not the other groups' vectors in the shared dict)."""
        for name in self.tinylora_v:
            if adapter_names is None or name in adapter_names:
                yield self.vector(name)

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """A, B (and P when saved) under this layer's path; v is saved once, by the tuner."""
        if adapter_name not in self.tinylora_A:
            return {}
        state = {
            f"{prefix}.tinylora_A": self.tinylora_A[adapter_name],
            f"{prefix}.tinylora_B": self.tinylora_B[adapter_name],
        }
        if self.tinylora_P.persistent:
            state[f"{prefix}.tinylora_P"] = self.tinylora_P[adapter_name]
        return state

    def _active_here(self) -> list[str]:
        return [name for name in self._active_adapter if name in self.tinylora_A]

    def _adapters_off(self) -> bool:
        """Disabled (unmerging first, as peft) or merged: the base layer alone gives the output."""
        if self._disable_adapters and self.merged:
            self.unmerge()
        return self._disable_adapters or self.merged

    # ------------------------------------------------------------------ merging (additive)
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W = B R A (out, in); transposed for Conv1D bases."""
        A, B = self.tinylora_A[adapter_name], self.tinylora_B[adapter_name]
        compute = torch.float32 if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16) else A.dtype
        R = self.mixing_matrix(adapter_name).to(A.device, compute)
        delta = B.to(compute) @ R @ A.to(compute)
        delta = delta.T if getattr(self, "fan_in_fan_out", False) else delta
        return delta.to(A.dtype)

    def __repr__(self) -> str:
        return "tinylora." + super().__repr__()


class Linear(TinyLoraLayer):
    """TinyLoRA on `nn.Linear` or transformers' `Conv1D`: `y = W x + B R A dropout(x)`."""

    def _init_geometry(self, base: nn.Module) -> None:
        self.fan_in_fan_out = is_transposed(base)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.is_target_conv_1d_layer = self.fan_in_fan_out

    def _dense_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._adapters_off():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_here():
            A, B = self.tinylora_A[name], self.tinylora_B[name]
            h = F.linear(self.tinylora_dropout[name](x).to(A.dtype), A)
            h = F.linear(h, self.mixing_matrix(name).to(A.dtype))
            result = result + F.linear(h, B)
        return result.to(x.dtype)  # peft returns the input's dtype


class Embedding(TinyLoraLayer):
    """TinyLoRA on `nn.Embedding`: `y = E[ids] + dropout(B[ids]) R A` (B has one row per token)."""

    def _init_geometry(self, base: nn.Module) -> None:
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._adapters_off():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_here():
            A = self.tinylora_A[name].to(result.dtype)
            B = self.tinylora_B[name].to(result.dtype)
            rows = self.tinylora_dropout[name](F.embedding(x, B))
            result = result + rows @ self.mixing_matrix(name).to(result.dtype) @ A
        return result


# ---------------------------------------------------------------------- dispatchers (TinyLoraModel.dispatchers)
dispatch_embedding = wraps(nn.Embedding, Embedding)
def _is_dense_linear(base: nn.Module) -> bool:
    """nn.Linear or Conv1D with a dense weight: the SVD needs the real values (no quantized bases, as peft)."""
    return isinstance(base, (nn.Linear, Conv1D)) and not is_quantized(base)


dispatch_linear = wraps(_is_dense_linear, Linear)
SUPPORTED_LAYERS = "`torch.nn.Linear`, `torch.nn.Embedding`, `transformers.pytorch_utils.Conv1D`"
