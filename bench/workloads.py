"""One training-step benchmark row, run in its own process (for a clean peak RSS).

    .venv/bin/python bench/workloads.py ROW [--lib peftkit|peft] [--steps 10] [--warmup 2] [--threads 2]

Prints one JSON line: {"row", "lib", "step_ms" (median), "steps_ms", "trainable", "peak_rss_mb"}.
`bench/run_all.py` runs every row this way and builds the table; this file also holds the workload
(model, batch, adapter configs) that the other bench scripts reuse.

Conventions (the same for every row):
    frozen   the bound: every parameter frozen, the embedding output made to require grad so the
             backward runs through all activations; forward + backward of the LM loss, no optimizer.
    adapters forward + backward + AdamW step over the trainable (adapter) parameters + zero_grad.
    full     every parameter trainable; forward + backward + AdamW step + zero_grad.
The library is imported by name (`peftkit` or `peft`): the two share the API, so the configs below
are written once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ, VOCAB = 8, 128, 8000


def llama_config(layers: int = 8) -> LlamaConfig:
    return LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=layers, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=512)


def make_model(layers: int = 8, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(layers))
    model.config.use_cache = False
    return model


def make_batch(batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lora_kwargs(dropout: float, **extra: Any) -> dict[str, Any]:
    return dict(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=dropout, task_type="CAUSAL_LM", **extra)


def adapter_config(lib: Any, row: str) -> Any:
    """The adapter config of `row` built from `lib` (the imported peft or peftkit module)."""
    if row == "lora_p05":
        return lib.LoraConfig(**lora_kwargs(0.05))
    if row == "lora_p0":
        return lib.LoraConfig(**lora_kwargs(0.0))
    if row == "dora_p0":
        return lib.LoraConfig(**lora_kwargs(0.0, use_dora=True))
    if row == "dora_p05":
        return lib.LoraConfig(**lora_kwargs(0.05, use_dora=True))
    if row == "ia3":
        return lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             task_type="CAUSAL_LM")
    if row == "loha":
        return lib.LoHaConfig(r=16, alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    if row == "lokr":
        return lib.LoKrConfig(r=16, alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    if row == "prefix":
        return lib.PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")
    if row == "bottleneck":
        return lib.BottleneckConfig(adapter_type="houlsby", reduction_factor=16, task_type="CAUSAL_LM")
    if row == "qlora":
        return lib.LoraConfig(**lora_kwargs(0.05))
    if row == "oft":
        return lib.OFTConfig(oft_block_size=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    if row == "boft":
        # one butterfly factor: peft without its CUDA extension (any CPU) silently trains with one
        return lib.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=ATTENTION_TARGETS,
                              task_type="CAUSAL_LM")
    if row == "vera":
        return lib.VeraConfig(r=256, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    if row == "fourierft":
        return lib.FourierFTConfig(n_frequency=1000, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    raise SystemExit(f"unknown row {row!r}")


ROWS = ["frozen", "lora_p05", "lora_p0", "dora_p0", "dora_p05", "ia3", "loha", "lokr", "prefix", "bottleneck",
        "qlora", "oft", "boft", "vera", "fourierft", "full"]
#: Rows peft cannot run (no such method in peft).
PEFTKIT_ONLY = {"bottleneck"}


def quantize_nf4(lib_name: str, model: nn.Module) -> nn.Module:
    """NF4 base: peftkit's own Linear4bit, or bitsandbytes' (CPU) for peft."""
    if lib_name == "peft":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
        from tests.bnb_helpers import bnb_quantize_model

        return bnb_quantize_model(model, quant_type="nf4", double_quant=True)
    from peftkit.quantization import QuantizationConfig, quantize_model

    config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return quantize_model(model, config)


def build(row: str, lib_name: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model of `row` ready to train, and its trainable parameters."""
    model = make_model()
    if row == "frozen":
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_())
        return model, []
    if row == "full":
        return model, list(model.parameters())
    lib = importlib.import_module(lib_name)
    if row == "qlora":
        model = quantize_nf4(lib_name, model)
    model = lib.get_peft_model(model, adapter_config(lib, row))
    return model, [p for p in model.parameters() if p.requires_grad]


def make_step(model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor) -> Callable[[], None]:
    # fused: what transformers' Trainer uses by default (optim="adamw_torch_fused"), for every library alike
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step: Callable[[], None], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return times


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("row", choices=ROWS)
    parser.add_argument("--lib", default="peftkit", choices=["peftkit", "peft"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, params = build(args.row, args.lib)
    model.train()
    times = time_steps(make_step(model, params, make_batch()), args.steps, args.warmup)
    trainable = sum(p.numel() for p in params)
    print(json.dumps({"row": args.row, "lib": args.lib, "step_ms": statistics.median(times),
                      "steps_ms": [round(t, 1) for t in times], "trainable": trainable,
                      "peak_rss_mb": round(peak_rss_mb(), 1)}))


if __name__ == "__main__":
    main()
