"""QLoRA figures: quantized bytes, dequantization error vs bitsandbytes, train-step time and peak memory.

    python bench/bench_qlora.py [--json out.json] [--steps 5]

Prints a table and writes JSON. A benchmark, not a test: numbers depend on the machine.
Each training row runs in a fresh process; its peak memory is that process's max RSS (CPU), which
includes the Python/torch baseline (same for every row), so compare rows with each other.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from peftkit.quantization import Linear4bit, QuantizationConfig, dequantize_4bit, quantize_4bit, quantize_model

try:
    import bitsandbytes.functional as bnb_functional
except Exception:  # noqa: BLE001 - the bitsandbytes columns are simply left out
    bnb_functional = None


def make_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the (non-head) linear weights: fp32, bf16, and as stored now (codes + constants)."""
    fp32 = stored = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            tensors = [module.weight, *module.buffers(recurse=False)]
            stored += sum(t.numel() * t.element_size() for t in tensors)
            fp32 += module.in_features * module.out_features * 4
        elif type(module) is nn.Linear and name != "lm_head":
            stored += module.weight.numel() * module.weight.element_size()
            fp32 += module.weight.numel() * 4
    return {"fp32": fp32, "bf16": fp32 // 2, "stored": stored}


def dequant_error(quant_type: str, double_quant: bool) -> dict[str, float]:
    torch.manual_seed(0)
    weight = torch.randn(1024, 1024) * 0.02
    ours = dequantize_4bit(*quantize_4bit(weight, quant_type, double_quant=double_quant))
    row = {"rel_error_vs_fp32": ((ours - weight).norm() / weight.norm()).item()}
    if bnb_functional is not None:
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type,
                                                     compress_statistics=double_quant)
        reference = bnb_functional.dequantize_4bit(packed, state)
        row["max_abs_diff_vs_bnb"] = (ours - reference).abs().max().item()
    return row


def bnb_model() -> nn.Module:
    from tests.bnb_helpers import bnb_quantize_model  # the test helper builds bitsandbytes layers on CPU

    return bnb_quantize_model(make_llama(), quant_type="nf4", double_quant=True)


def train_steps(model: nn.Module, steps: int) -> dict[str, float]:
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=0.05, task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not timed
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_ms": 1000 * sum(times[1:]) / steps, "peak_rss_mb": peak_mb}


def training_row(name: str, steps: int) -> dict[str, float]:
    """One training configuration, measured in this (fresh) process."""
    torch.set_num_threads(1)
    if name == "lora_fp32":
        model = make_llama()
    elif name == "qlora_peftkit_nf4+dq":
        model = quantize_model(make_llama(), QuantizationConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    else:
        model = bnb_model()
    return train_steps(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), steps)


def training_row_in_subprocess(name: str, steps: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--row", name, "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="bench_qlora.json")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--row", help="internal: measure one training row and print it as JSON")
    args = parser.parse_args()
    if args.row:
        print(json.dumps(training_row(args.row, args.steps)))
        return
    torch.set_num_threads(1)

    nf4_dq = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    sizes = {"nf4+dq": linear_weight_bytes(quantize_model(make_llama(), nf4_dq)),
             "nf4": linear_weight_bytes(quantize_model(make_llama(), QuantizationConfig(load_in_4bit=True)))}
    errors = {f"{qt}{'+dq' if dq else ''}": dequant_error(qt, dq) for qt in ("nf4", "fp4") for dq in (False, True)}
    rows = ["lora_fp32", "qlora_peftkit_nf4+dq"] + (["qlora_bitsandbytes_nf4+dq"] if bnb_functional else [])
    training = {name: training_row_in_subprocess(name, args.steps) for name in rows}

    print("| format | linear bytes | x fp32 | x bf16 |\n|---|---|---|---|")
    for name, row in sizes.items():
        print(f"| {name} | {row['stored']:,} | {row['stored'] / row['fp32']:.3f} | {row['stored'] / row['bf16']:.3f} |")
    print("\n| 4-bit type | rel. error vs fp32 | max abs diff vs bitsandbytes |\n|---|---|---|")
    for name, row in errors.items():
        print(f"| {name} | {row['rel_error_vs_fp32']:.4f} | {row.get('max_abs_diff_vs_bnb', float('nan')):.2e} |")
    print("\n| training (1 thread, batch 4x64) | step ms | peak RSS MB |\n|---|---|---|")
    for name, row in training.items():
        print(f"| {name} | {row['step_ms']:.1f} | {row['peak_rss_mb']:.1f} |")
    with open(args.json, "w") as handle:
        json.dump({"bytes": sizes, "dequant_error": errors, "training": training}, handle, indent=2)


if __name__ == "__main__":
    main()
