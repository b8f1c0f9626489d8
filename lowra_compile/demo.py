"""`lowra demo`: 2-bit LoRA fine-tuning of SmolLM2-135M on the King James Bible, on whatever device is here.

Loads the packaged SmolLM2, wraps it with PEFT LoRA on every attention and MLP projection, quantizes it
at the requested bit budget calibrated on the first few training batches (`quantize_on`: one batch at a
time), compiles it with `backend="lowra"` and fine-tunes it on the training split with an ordinary loop. Prints held-out perplexity of the unquantized model, of the quantized model before
fine-tuning (LoftQ-initialised adapters included) and after, then the kernel report. The defaults fit in
well under 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def options(args: argparse.Namespace) -> dict:
    """The backend's options for the demo's arguments (`lowra demo --help`)."""
    return {"bits": args.bits, "inner": args.inner}


def lora_model(model: torch.nn.Module, rank: int, seed: int = 0, dora: bool = False) -> torch.nn.Module:
    """PEFT LoRA (alpha = 2 * rank, dropout 0.05) on all attention and MLP projections, seeded; DoRA's if `dora`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
                        use_dora=dora)
    with warnings.catch_warnings():  # PEFT asks for transformers' deprecated is_gradient_checkpointing: not ours to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)


def run(args: argparse.Namespace) -> None:
    """The demo (module docstring), for arguments that `lowra demo` has checked."""
    import lowra_compile

    from .finetune import finetune, quantize_on, training_batches
    from .perplexity import perplexity
    from .smollm import load_smollm2
    from .texts import load_split, split_text, token_windows

    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    split = load_split("kjv", seed=args.seed)
    train = token_windows(tokenizer, split_text(split["train"]), args.window)
    heldout = token_windows(tokenizer, split_text(split["heldout"]), args.window, args.eval_windows)
    batches = training_batches(train, args.steps, args.batch_size, args.seed)
    model = lora_model(model, args.rank, args.seed, args.dora)
    adapter = "DoRA" if args.dora else "LoRA"
    print(f"SmolLM2-135M + {adapter} r={args.rank}; KJV: {len(train)} training windows, {len(heldout)} held-out windows of {args.window} tokens")

    ppl = {"unquantized": perplexity(model, heldout, desc="perplexity, unquantized")}
    print(f"held-out perplexity, unquantized: {ppl['unquantized']:.2f}")

    t0 = time.perf_counter()
    calib = batches[: args.calib_batches]
    quantize_on(model, calib, options(args))
    compiled = torch.compile(model, backend="lowra", options=options(args))
    tokens = sum(b.numel() for b in calib)
    print(f"quantized to {args.bits} bits, calibrated on {tokens} tokens, in {time.perf_counter() - t0:.0f} s")
    ppl["quantized"] = perplexity(compiled, heldout, desc="perplexity, quantized")
    print(f"held-out perplexity, {args.bits}-bit before fine-tuning: {ppl['quantized']:.2f}")

    losses = finetune(compiled, batches, lr=args.lr, seed=args.seed)
    ppl["fine-tuned"] = perplexity(compiled, heldout, desc="perplexity, fine-tuned")

    print(lowra_compile.report(compiled))
    rows = {
        "unquantized (fp32)": ppl["unquantized"],
        f"lowra {args.bits:g} bits, before fine-tuning": ppl["quantized"],
        f"lowra {args.bits:g} bits, after {args.steps} {adapter} steps": ppl["fine-tuned"],
    }
    print(f"\nheld-out KJV perplexity ({len(heldout)} windows x {args.window} tokens):")
    for label, value in rows.items():
        print(f"  {label:<40} {value:8.2f}")
    print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}; total time {time.perf_counter() - start:.0f} s")
