r"""AdaMSS layers: a frozen `nn.Linear` whose update lives in K clustered subspaces of its SVD.

Built once per adapter from the base weight (bias appended as a last column when present):

    W~ = [W | b]                        (out x in~),  in~ = in + 1 with a bias, else in
    W~ ~ U_r S_r V_r^T                  randomized SVD, rank r' = min(r, out, in~), seeded (random_seed)
    rows {0..out-1} = S_1 u ... u S_K   KMeans on the rows of U_r (K' = min(K, out) clusters)
    newB = V_r^T                        (r' x in~), a frozen buffer (saved as `adamss_newB`)

Per subspace k (rows S_k, n_k = |S_k|), with U_k = U_r[S_k, :]  (n_k x r'):

    rank r_k = min(n_k, subspace_rank)                       (>= 1), or with use_dynamic_rank:
             = min(#{s in svd(U_k U_k^T) : s > svd_threshold * s_max}, subspace_rank)
    A_k = Q^T,  Q R = qr(U_k^T G_k),  G_k = top-r_k left singular vectors of U_k U_k^T   (r_k x r')
    B_k = 0 (init_weights="orthogonal", a no-op)  or  0.01 * N(0, 1) (init_weights=None)  (n_k x r_k)

Forward (x~ = [x | 1] with a bias, else x):

    y = base(x) + P( concat_k  B_k A_k newB x~ )       P: puts the k-th block on rows S_k

Merging adds delta_W~ = P(concat_k B_k A_k newB) to [W | b] (its last column to the bias);
unmerging subtracts it. ASA (Adaptive Subspace Allocation) scores each subspace by an EMA of
|p * grad p| times an EMA of its change, and freezes all but the globally top-scored ones.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._core.base_layers import wraps
from .._core.buffer_dict import BufferDict
from .._core.layer import BaseTunerLayer

SUPPORTED_LAYERS = "`torch.nn.Linear`"

#: KMeans settings (peft's): random init, one run, 10 iterations, a fixed random_state.
KMEANS_ITERATIONS = 10
KMEANS_RANDOM_STATE = 123456789


def seeded_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r (out x r'), V_r^T (r' x in~)) of a randomized SVD, r' = min(rank, *matrix.shape).

    The random projection of `torch.svd_lowrank` is drawn from a forked RNG seeded with `seed`
    (the global RNG stream is left as it was), so the same weight gives the same factors.
    """
    rank = min(rank, *matrix.shape)
    device = matrix.device
    if device.type == "cpu":
        fork: dict[str, Any] = {"devices": []}
    else:
        fork = {"devices": [device], "device_type": device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(matrix, q=rank, niter=2, M=None)
    return u[:, :rank].contiguous(), v[:, :rank].T.contiguous()


def cluster_rows(u: torch.Tensor, num_subspaces: int) -> tuple[torch.Tensor, int]:
    """KMeans labels (int64, one per row of `u`) and the number of clusters, min(K, rows)."""
    try:
        from sklearn.cluster import KMeans
    except ImportError as error:
        raise ImportError(
            "scikit-learn is required for AdaMSS initialization. Please install it with: pip install scikit-learn"
        ) from error
    rows = u.detach().cpu().numpy().astype("float32")
    count = min(num_subspaces, rows.shape[0])
    kmeans = KMeans(
        n_clusters=count, init="random", n_init=1, max_iter=KMEANS_ITERATIONS, random_state=KMEANS_RANDOM_STATE
    )
    return torch.from_numpy(kmeans.fit_predict(rows)).long(), count


def subspace_rows(labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """Cluster id -> the (sorted) row indices with that label."""
    return {k: torch.where(labels == k)[0] for k in range(int(labels.max().item()) + 1)}


class AdamssLayer(BaseTunerLayer, nn.Module):
    """AdaMSS over an `nn.Linear`: per adapter its projection newB and per-subspace A_k, B_k."""

    adapter_layer_names = ("adamss_A", "adamss_B")
    other_param_names = (
        "num_subspaces",
        "train_subspace_index",
        "seg_result",
        "scatter_index",
        "exp_avg_ipt_A",
        "exp_avg_ipt_B",
        "exp_avg_unc_A",
        "exp_avg_unc_B",
        "adamss_newB",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, **layer_kwargs: Any) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adamss_A = nn.ModuleDict({})
        self.adamss_B = nn.ModuleDict({})
        self.adamss_newB = BufferDict(persistent=True)
        self.num_subspaces: dict[str, int] = {}
        self.train_subspace_index: dict[str, list[int]] = {}
        self.seg_result: dict[str, dict[int, torch.Tensor]] = {}
        self.scatter_index: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt_A: dict[str, list] = {}
        self.exp_avg_ipt_B: dict[str, list] = {}
        self.exp_avg_unc_A: dict[str, list] = {}
        self.exp_avg_unc_B: dict[str, list] = {}
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, **layer_kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.get_base_layer().weight.dtype

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int = 100,
        num_subspaces: int = 5,
        subspace_rank: int = 1,
        init_weights: Optional[str] = "orthogonal",
        use_asa: bool = False,
        use_dynamic_rank: bool = False,
        svd_threshold: float = 0.1,
        random_seed: int = 0,
        inference_mode: bool = False,
    ) -> None:
        """Add `adapter_name`: SVD, clustering and the per-subspace A_k (QR) and B_k (see the module doc)."""
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        device, dtype = weight.device, weight.dtype
        full = weight if bias is None else torch.cat((weight, bias.unsqueeze(1)), dim=1)
        full = full.detach().to(device=device, dtype=torch.float32)
        u, vt = seeded_svd(full, r, random_seed)
        labels, count = cluster_rows(u, num_subspaces)
        rows = subspace_rows(labels)
        order = list(range(count))
        a_params, b_params = [], []
        for k in order:
            index = rows[k]
            u_k = u[index, :r]
            if use_dynamic_rank:
                gram = u_k @ u_k.T
                _, s, _ = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)
                rank = min(int((s > svd_threshold * s[0]).sum().item()), subspace_rank, len(s))
            else:
                rank = min(len(index), subspace_rank)
            rank = max(rank, 1)
            gram = u_k @ u_k.T
            g, _, _ = torch.svd_lowrank(gram, q=min(gram.shape[0], rank), niter=2)
            q, _ = torch.linalg.qr(u_k.T @ g[:, :rank], mode="reduced")
            a_init = q.T.contiguous()
            if init_weights == "orthogonal":
                b_init = torch.zeros(len(index), rank, dtype=dtype, device=device)
            else:
                b_init = torch.randn(len(index), rank, dtype=dtype, device=device) * 0.01
            a_params.append(nn.Parameter(a_init.to(dtype)))
            b_params.append(nn.Parameter(b_init.to(dtype)))
        self.num_subspaces[adapter_name] = count
        self.train_subspace_index[adapter_name] = order
        self.seg_result[adapter_name] = rows
        self.adamss_newB[adapter_name] = vt.detach().to(dtype)
        self.adamss_A[adapter_name] = nn.ParameterList(a_params)
        self.adamss_B[adapter_name] = nn.ParameterList(b_params)
        if use_asa:
            for stats in (self.exp_avg_ipt_A, self.exp_avg_ipt_B, self.exp_avg_unc_A, self.exp_avg_unc_B):
                stats[adapter_name] = [None] * count
        self.scatter_index[adapter_name] = torch.cat([rows[k] for k in order]).long()
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def _move_adapter_to_base(self, adapter_name: str, keep_fp32: bool = True) -> None:
        """A_k, B_k as the core moves adapters; newB too (fp32 over fp16/bf16 bases with `keep_fp32`, as peft)."""
        super()._move_adapter_to_base(adapter_name, keep_fp32)
        if adapter_name not in self.adamss_newB:
            return
        weight = self.get_base_layer().weight
        newb = self.adamss_newB[adapter_name]
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if keep_fp32 and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        device = newb.device if newb.is_meta or weight.is_meta else weight.device
        self.adamss_newB[adapter_name] = newb.to(device, dtype)

    def adapter_state(self, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
        """A_k, B_k (`adamss_A.<k>`, `adamss_B.<k>`) and the projection `adamss_newB` (peft's keys)."""
        state = super().adapter_state(adapter_name, prefix)
        if adapter_name in self.adamss_newB:
            state[f"{prefix}.adamss_newB"] = self.adamss_newB[adapter_name]
        return state

    def refit_to(self, adapter_name: str, attr: str, index: int, shape: torch.Size) -> None:
        """Replace `attr[adapter_name][index]` by an empty parameter of `shape` (a checkpoint's clustering)."""
        params = getattr(self, attr)[adapter_name]
        old = params[index]
        params[index] = nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad)

    # ------------------------------------------------------------------ ASA
    def reset_importance(self, adapter_name: str) -> None:
        """Forget the importance statistics of `adapter_name` (after each ASA mask)."""
        if adapter_name in self.exp_avg_ipt_A:
            count = len(self.exp_avg_ipt_A[adapter_name])
            for stats in (self.exp_avg_ipt_A, self.exp_avg_ipt_B, self.exp_avg_unc_A, self.exp_avg_unc_B):
                stats[adapter_name] = [None] * count

    def update_importance(self, adapter_name: str, importance_beta: float = 0.85, uncertainty_beta: float = 0.85) -> None:
        """EMA updates from the current gradients: I = |p * grad|, U <- EMA(|I - I_avg|), I_avg <- EMA(I)."""
        if adapter_name not in self.exp_avg_ipt_A or adapter_name not in self.adamss_A:
            return
        pairs = (
            (self.adamss_A[adapter_name], self.exp_avg_ipt_A[adapter_name], self.exp_avg_unc_A[adapter_name]),
            (self.adamss_B[adapter_name], self.exp_avg_ipt_B[adapter_name], self.exp_avg_unc_B[adapter_name]),
        )
        for k in range(self.num_subspaces[adapter_name]):
            for params, importance, uncertainty in pairs:
                param = params[k]
                if param.grad is None:
                    continue
                if importance[k] is None:
                    importance[k] = torch.zeros_like(param, requires_grad=False)
                    uncertainty[k] = torch.zeros_like(param, requires_grad=False)
                current = (param * param.grad).abs().detach()
                uncertainty[k].mul_(uncertainty_beta).add_((current - importance[k]).abs(), alpha=1 - uncertainty_beta)
                importance[k].mul_(importance_beta).add_(current, alpha=1 - importance_beta)

    def subspace_score(self, adapter_name: str, k: int) -> Optional[torch.Tensor]:
        """mean(I_A * U_A) + mean(I_B * U_B) of subspace k, None before any statistics."""
        ipt_a, ipt_b = self.exp_avg_ipt_A[adapter_name][k], self.exp_avg_ipt_B[adapter_name][k]
        if ipt_a is None or ipt_b is None:
            return None
        unc_a, unc_b = self.exp_avg_unc_A[adapter_name][k], self.exp_avg_unc_B[adapter_name][k]
        return (ipt_a * unc_a).mean() + (ipt_b * unc_b).mean()

    def set_subspace_active(self, adapter_name: str, k: int, active: bool) -> None:
        """Train (or freeze, dropping its gradient) subspace k's A_k and B_k."""
        for attr in ("adamss_A", "adamss_B"):
            params = getattr(self, attr)[adapter_name]
            if k < len(params):
                params[k].requires_grad = active
                if not active:
                    params[k].grad = None

    # ------------------------------------------------------------------ the update
    def _inverse_order(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        """The permutation that puts the concatenated subspace rows back in the layer's row order."""
        return torch.argsort(self.scatter_index[adapter_name].to(device))

    def _full_delta(self, adapter_name: str) -> torch.Tensor:
        """P(concat_k B_k A_k newB): (out, in~), in the base dtype (fp32 for fp16/bf16 on CPU)."""
        weight = self.get_base_layer().weight
        device, dtype = weight.device, weight.dtype
        if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        newb = self.adamss_newB[adapter_name].to(device, dtype)
        blocks = [
            b.to(device, dtype) @ a.to(device, dtype) @ newb
            for a, b in zip(self.adamss_A[adapter_name], self.adamss_B[adapter_name])
        ]
        return torch.cat(blocks, dim=0)[self._inverse_order(adapter_name, device)]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta_W (out, in): the update without its bias column."""
        delta = self._full_delta(adapter_name)
        weight = self.get_base_layer().weight
        if self.get_base_layer().bias is not None:
            delta = delta[:, :-1]
        return delta.to(weight.dtype)

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor:
        """delta_b (out,): the update's bias column (zeros without a bias)."""
        weight = self.get_base_layer().weight
        if self.get_base_layer().bias is None:
            return torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)
        return self._full_delta(adapter_name)[:, -1].to(weight.dtype)

    def fold(self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[W | b] + delta_W~."""
        delta = self._full_delta(adapter_name)
        if bias is None:
            return weight + delta.to(weight.dtype), bias
        return weight + delta[:, :-1].to(weight.dtype), bias + delta[:, -1].to(bias.dtype)

    def unfold(self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[W | b] - delta_W~."""
        delta = self._full_delta(adapter_name)
        if bias is None:
            return weight - delta.to(weight.dtype), bias
        return weight - delta[:, :-1].to(weight.dtype), bias - delta[:, -1].to(bias.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        dtype = self.dtype
        x = x.to(dtype)
        result = self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.adamss_A]
        if not active:
            return result.to(previous_dtype)
        if self.get_base_layer().bias is not None:
            x = torch.cat((x, torch.ones(*x.shape[:-1], 1, device=x.device, dtype=dtype)), dim=-1)
        for name in active:
            projected = F.linear(x, self.adamss_newB[name].to(dtype))
            blocks = [
                F.linear(F.linear(projected, a.to(dtype)), b.to(dtype))
                for a, b in zip(self.adamss_A[name], self.adamss_B[name])
            ]
            delta = torch.cat(blocks, dim=-1)[..., self._inverse_order(name, blocks[0].device)]
            result = result + delta
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "adamss." + super().__repr__()


Linear = AdamssLayer
#: nn.Linear only (peft's AdaMSS wraps nothing else).
dispatch_linear = wraps(nn.Linear, AdamssLayer)
