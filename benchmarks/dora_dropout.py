"""What a DoRA step costs against a LoRA step, and how much of it is lora_dropout, on the packaged SmolLM2.

The demo's settings (`lowra demo`: rank 8 on the seven projections, 4 windows of 256 KJV tokens a step,
AdamW lr 1e-3, 2.0 bits, eager glue) on whatever device is here, one variant per process:

    lora           PEFT LoRA, lora_dropout 0.05 (the demo's)
    dora           PEFT DoRA, lora_dropout 0.05 (`lowra demo --dora`)
    dora-nodrop    PEFT DoRA, lora_dropout 0

With dropout, PEFT's DoRA computes the base layer's output of the dropped-out input as well (it scales that
one by magnitude / norm), so every base linear runs twice, forward and backward; without it, DoRA reuses
the base output. Quantizing rounds to nearest here (the step time does not depend on how the codes were
found, and it is the quicker plan). Reported: the median step time of the last `--steps - 3` steps, the
first step (which quantizes), and the layers left dense.

    python benchmarks/dora_dropout.py                 # all three (about 10 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import lowra_compile
from bench_utils import environment, print_result, variant_in_process, write_json

VARIANTS = {"lora": (False, 0.05), "dora": (True, 0.05), "dora-nodrop": (True, 0.0)}


def run_variant(variant: str, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from lowra_compile.demo import LORA_TARGETS
    from lowra_compile.finetune import training_batches
    from lowra_compile.smollm import load_smollm2
    from lowra_compile.texts import load_split, split_text, token_windows

    dora, dropout = VARIANTS[variant]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    train = token_windows(tokenizer, split_text(load_split("kjv", seed=0)["train"]), 256)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
                        use_dora=dora)
    model = get_peft_model(model, config).to(device)
    options = {"bits": 2.0, "inner": "eager", "rounding": "nearest", "progress": False}
    compiled = torch.compile(model, backend="lowra", options=options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for ids in training_batches(train, steps, 4, 0):
        ids = ids.to(device)
        t0 = time.perf_counter()
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "use_dora": dora, "lora_dropout": dropout, "step_s": statistics.median(times[3:]),
            "first_step_s": times[0], "steps_s": times, "dense": list(lowra_compile.report(model).dense)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON path (default: $OUT or benchmarks/results/)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=12, help="steps per variant, the first three untimed")
    p.add_argument("--variant", help="run one variant in this process and print its result (used internally)")
    args = p.parse_args(argv)
    if args.steps < 4:
        raise SystemExit("--steps must be at least 4: the first three are not timed")
    if args.variant:
        print_result(run_variant(args.variant, args.steps))
        return
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)]
        rows.append(variant_in_process(cmd, variant))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "steps_s"}), flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_json("dora_dropout", {"benchmark": "dora_dropout", "env": environment(device), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
