r"""RoAd's rotation: each pair of output elements is turned (and scaled) by its own 2 x 2 matrix.

The output vector is cut into groups of `group_size` g; inside a group, element k (k < g/2) is
paired with element k + g/2, h = g/2 (as in rotary embeddings, done per group):

    y'_k     = f_k     y_k  -  s_k     y_{k+h}          [ y'_k     ]   [ f_k      -s_k     ] [ y_k     ]
    y'_{k+h} = s_{k+h} y_k  +  f_{k+h} y_{k+h}          [ y'_{k+h} ] = [ s_{k+h}   f_{k+h} ] [ y_{k+h} ]

with f = alpha * cos(theta), s = alpha * sin(theta) per output element. The variants share the
learned values differently (out = out_features):

    road_1   theta, alpha: (out/2,)   one angle / scale per pair: f_k = f_{k+h}, s_k = s_{k+h}
    road_2   theta, alpha: (out,)     one per element
    road_4   theta, alpha: (2 out,)   per group [g for the cos term | g for the sin term]:
                                      f = alpha_cos * cos(theta_cos), s = alpha_sin * sin(theta_sin)

So `rotate_pairs` costs two multiplies per element: R (out x out) is never formed. Its inverse is
of the same form (`inverse_coefficients`), with det_k = f_k f_{k+h} + s_k s_{k+h}:

    F_k = f_{k+h} / det_k,  F_{k+h} = f_k / det_k,  S_k = -s_k / det_k,  S_{k+h} = -s_{k+h} / det_k
"""

from __future__ import annotations

import torch

from ...errors import AdapterStateError


def rotation_coefficients(
    variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, s), each (out,): the diagonal and the off-diagonal factors of R (see the module docstring)."""
    half = group_size // 2
    if variant == "road_1":
        # One value per pair, used by both of its elements: repeat it for each half of its group.
        theta = theta.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_4":
        theta = theta.reshape(-1, 2, group_size)
        alpha = alpha.reshape(-1, 2, group_size)
        return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)
    raise ValueError(f"Unsupported variant {variant} for RoadLayer. Supported variants are road_1, road_2, and road_4.")


def rotate_pairs(y: torch.Tensor, f: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """R y along the last dimension: `y * f + swap(y) * s`, swap(y)_k = -y_{k+h}, swap(y)_{k+h} = y_k.

    `f` and `s` broadcast against `y` ((out,), or (rows, 1, ..., out) for one R per batch row).
    """
    pairs = y.unflatten(-1, (-1, 2, group_size // 2))
    swapped = torch.stack((-pairs[..., 1, :], pairs[..., 0, :]), dim=-2).flatten(-3)
    return y * f + swapped * s


def inverse_coefficients(
    f: torch.Tensor, s: torch.Tensor, group_size: int, adapter_name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, S) of R^-1, in the same form as (f, s); a singular pair (det 0) cannot be undone."""
    half = group_size // 2
    f_pairs, s_pairs = f.reshape(-1, 2, half), s.reshape(-1, 2, half)
    det = f_pairs[:, 0] * f_pairs[:, 1] + s_pairs[:, 0] * s_pairs[:, 1]
    if bool((det == 0).any()):
        raise AdapterStateError(
            f"RoAd adapter {adapter_name!r} has a singular 2x2 rotation (a scale alpha of 0), so unmerging "
            "cannot restore the base weights; reload the base model instead."
        )
    inverse_f = torch.stack((f_pairs[:, 1], f_pairs[:, 0]), dim=1) / det.unsqueeze(1)
    inverse_s = -s_pairs / det.unsqueeze(1)
    return inverse_f.reshape(-1), inverse_s.reshape(-1)


def dense_rotation(f: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """R as an (out x out) matrix (for inspection and tests; the layers never form it)."""
    eye = torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
    return rotate_pairs(eye, f, s, group_size).T
