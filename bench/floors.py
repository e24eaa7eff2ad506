"""Measured floors: the frozen bound plus only the matmuls a method cannot avoid, timed against the bound.

    .venv/bin/python bench/floors.py [FLOOR ...] [--pairs 10] [--threads 2]

Where a target of `RESULTS.md` is out of reach, this shows it with a measurement rather than an
estimate. Each floor is the frozen model (`workloads.build("frozen")`) with every LoRA target
layer (q, k, v, o, gate, up, down) replaced by a function doing the base layer's work plus the
extra full-size matmuls the method's maths requires, and nothing else (no adapter parameters, no
optimizer, no Python beyond one autograd function per layer):

    loha       backward adds G = grad^T x (out x in), which delta_W's factor gradients need:
               delta_W = (B1 A1) * (B2 A2) is full rank, so its gradient is too
    dora_p05   forward adds W dropout(x) and backward its input gradient: with active dropout,
               peft's DoRA applies (m / ||W + s B A|| - 1) to W dropout(x), not to W x
    lora_r16   forward and backward add LoRA's six rank-16 matmuls (A, B; hidden, dA, dB, dx)

As in `paired.py`, the floor model and the frozen model share the process and their steps
alternate; the ratio printed is the median over pairs. A benchmark; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from paired import frozen_bound, paired_ratio, pairing_options  # noqa: E402
from workloads import LORA_TARGETS, build, make_step  # noqa: E402

RANK = 16


class FloorLinear(torch.autograd.Function):
    """y = x W^T (+ W x' forward / extra matmuls backward, per `kind`); gradients only for x."""

    @staticmethod
    def forward(ctx, x, weight, kind, a, b):  # type: ignore[override]
        rows = x.reshape(-1, x.shape[-1])
        out = rows.mm(weight.t())
        if kind == "dora_p05":
            out.add_(rows.mm(weight.t()))  # the second base matmul, on the (here undropped) input
        hidden = rows.mm(a.t()) if kind == "lora_r16" else None
        if hidden is not None:
            out.addmm_(hidden, b.t())
        ctx.kind = kind
        ctx.save_for_backward(x, weight, a, b, hidden)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        x, weight, a, b, hidden = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        grad_x = grad.mm(weight)
        if ctx.kind == "loha":
            grad.t().mm(rows)  # G, delta_W's gradient
        elif ctx.kind == "dora_p05":
            grad_x.addmm_(grad, weight)  # the input gradient of the second matmul
        elif ctx.kind == "lora_r16":
            grad.t().mm(hidden)  # dB
            grad_hidden = grad.mm(b)
            grad_hidden.t().mm(rows)  # dA
            grad_x.addmm_(grad_hidden, a)
        return grad_x.view(x.shape), None, None, None, None


class Floor(nn.Module):
    def __init__(self, base: nn.Linear, kind: str) -> None:
        super().__init__()
        self.base, self.kind = base, kind
        self.a = torch.randn(RANK, base.in_features) * 0.01
        self.b = torch.randn(base.out_features, RANK) * 0.01

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FloorLinear.apply(x, self.base.weight, self.kind, self.a, self.b)


def floor_model(kind: str) -> nn.Module:
    model, _ = build("frozen", "peftkit")
    targets = [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in LORA_TARGETS]
    for name, module in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[-1], Floor(module, kind))
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("floors", nargs="*", default=["lora_r16", "loha", "dora_p05"])
    args = pairing_options(parser).parse_args()
    frozen, ids = frozen_bound("peftkit", args.threads)
    for kind in args.floors:
        step = make_step(floor_model(kind).train(), [], ids)
        result = paired_ratio(frozen, step, args.pairs, args.warmup)
        print(json.dumps({"floor": kind, **result}), flush=True)


if __name__ == "__main__":
    main()
