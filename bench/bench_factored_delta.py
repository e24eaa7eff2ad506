"""Time LoHa / LoKr adapter forward (+ backward) with the delta materialised vs. factored.

    .venv/bin/python bench/bench_factored_delta.py [--quick] [--threads N] [--device cpu|cuda]

Prints one row per (method, layer, rank, input): milliseconds of an inference forward and of a
training step (forward + backward) of the wrapped layer in each mode, the ratios, and the mode
`delta_mode="auto"` picks from its multiply-add estimate. Timings depend on the machine; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from peftkit import LoHaConfig, LoKrConfig, get_peft_model

LAYERS: dict[str, Callable[[], nn.Module]] = {
    "linear 1024x1024": lambda: nn.Linear(1024, 1024),
    "linear 4096x1024": lambda: nn.Linear(1024, 4096),
    "conv2d 64->64 3x3": lambda: nn.Conv2d(64, 64, 3, padding=1),
    "conv2d 256->256 3x3": lambda: nn.Conv2d(256, 256, 3, padding=1),
}


def make_input(layer: nn.Module, batch: int, device: str) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.randn(max(batch // 64, 1), layer.in_channels, 16, 16, device=device)  # batch/64 images of 16x16
    return torch.randn(batch, layer.in_features, device=device)


def best_ms(step: Callable[[], None], repeats: int, device: str) -> float:
    """Fastest of `repeats` runs in milliseconds (the least disturbed by other processes)."""
    step()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def forward_ms(layer: nn.Module, x: torch.Tensor, repeats: int, device: str) -> float:
    def step() -> None:
        with torch.no_grad():
            layer(x)

    return best_ms(step, repeats, device)


def train_step_ms(layer: nn.Module, x: torch.Tensor, repeats: int, device: str) -> float:
    return best_ms(lambda: layer(x).sum().backward(), repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ranks = [4, 16] if args.quick else [4, 8, 16, 32]
    batches = [1, 512] if args.quick else [1, 64, 512, 2048]
    repeats = 5 if args.quick else 9

    print(f"device={args.device} threads={torch.get_num_threads()}; ms = fastest of {repeats} runs; "
          "fwd = inference forward, train = forward + backward; speed-up = materialized / factored")
    header = (
        f"{'method':6} {'layer':20} {'r':>3} {'input':>18} | {'fwd mat':>8} {'fwd fact':>8} {'x':>6} | "
        f"{'train mat':>9} {'train fact':>10} {'x':>6} | auto"
    )
    print(header)
    print("-" * len(header))
    for method, config_cls in (("loha", LoHaConfig), ("lokr", LoKrConfig)):
        for layer_name, make_layer in LAYERS.items():
            for r in ranks:
                torch.manual_seed(0)
                config = config_cls(r=r, target_modules=["0"], init_weights=False)
                model = get_peft_model(nn.Sequential(make_layer()), config)
                layer = model.base_model.model[0].to(args.device)
                for batch in batches:
                    x = make_input(layer.base_layer, batch, args.device)
                    fwd, train = {}, {}
                    for mode in ("materialized", "factored"):
                        layer.delta_mode = mode
                        fwd[mode] = forward_ms(layer, x, repeats, args.device)
                        train[mode] = train_step_ms(layer, x, repeats, args.device)
                    layer.delta_mode = "auto"
                    auto = layer._path(x, "default")[:4]
                    fwd_ratio = fwd["materialized"] / fwd["factored"]
                    train_ratio = train["materialized"] / train["factored"]
                    print(
                        f"{method:6} {layer_name:20} {r:>3} {str(tuple(x.shape)):>18} | "
                        f"{fwd['materialized']:>8.2f} {fwd['factored']:>8.2f} {fwd_ratio:>5.2f}x | "
                        f"{train['materialized']:>9.2f} {train['factored']:>10.2f} {train_ratio:>5.2f}x | {auto}"
                    )


if __name__ == "__main__":
    main()
