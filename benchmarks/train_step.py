"""A Llama-2-7B-shaped LoRA training step: peak memory and step time, bf16 LoRA vs QLoRA vs lowra (issue 3).

The model is LlamaForCausalLM built from a transformers config with random bf16 weights on the GPU
(kernel speed and memory do not depend on trained values), PEFT LoRA r=64 on all seven projections,
one batch of 1 x 2048 tokens, gradient checkpointing, AdamW on the adapters. With `--model mixtral`, a
4.7B mixture of experts of Mixtral's layout (16 layers, 8 experts of 2048 -> 5632, 2 per token, stacked in
one tensor per layer as transformers 5 keeps them) with the adapters on the attention, the experts frozen
(lowra packs them and runs its grouped op; bitsandbytes has no grouped 4-bit product, so no NF4 row).
Variants:
    bf16 LoRA          the PEFT model as is (eager)
    bnb QLoRA NF4      every projection replaced by bitsandbytes Linear4bit (when importable)
    lowra 2.0 / 1.5    torch.compile(model, backend="lowra", options={"bits": b})
and with `--dora`, PEFT's DoRA (use_dora=True) on the same three bases: bf16 DoRA, bnb QDoRA NF4, lowra 2.0
DoRA (lora_dropout is 0 throughout: with dropout PEFT's DoRA runs each base linear a second time).
Each variant runs in its own process so peak memory is its own. Reported: steady-state peak memory
and median step time over the timed steps, the first step's time (for lowra: quantization, plan,
LoftQ and compilation, the one-off cost), the peak memory and time of saving the adapters with PEFT's
`save_pretrained` (which builds the whole state dict first), plus the lowra kernel log.

    python benchmarks/train_step.py                          # every variant (GPU)
    python benchmarks/train_step.py --variants "lowra 2.0"   # a subset
    python benchmarks/train_step.py --quick                  # tiny model on CPU, smoke test
    python benchmarks/train_step.py --model mixtral          # the mixture of experts (--quick: a tiny one)
    python benchmarks/train_step.py --dora                   # the DoRA variants
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import torch

import lowra_compile
from lowra_compile.passes.release import packed_weight
from bench_utils import (bnb_available, device_and_dtype, environment, parser, print_result, variant_in_process,
                         write_json)

# lowra 2.0 and its baseline first: each row is written as soon as it is measured
VARIANTS = ["lowra 2.0", "bf16 LoRA", "bnb QLoRA NF4", "lowra 1.5"]
DORA_VARIANTS = ["lowra 2.0 DoRA", "bf16 DoRA", "bnb QDoRA NF4"]
VARIANT_TIMEOUT_S = 420  # a variant past it is killed and recorded as such, and the next one runs
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MIXTRAL_SMALL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                     num_local_experts=8, num_experts_per_tok=2)
EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model(quick: bool, device: torch.device, dtype: torch.dtype, mixtral: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    if mixtral:
        config = MixtralConfig(**({**TINY, **EXPERTS} if quick else MIXTRAL_SMALL), tie_word_embeddings=False)
        model_class = MixtralForCausalLM
    else:
        config = LlamaConfig(**(TINY if quick else LLAMA_7B), tie_word_embeddings=False)
        model_class = LlamaForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in bf16 directly: a 7B model in fp32 would not fit beside it
    try:
        with torch.device(device):
            return model_class(config)
    finally:
        torch.set_default_dtype(default)


def to_nf4(model, dtype: torch.dtype) -> None:
    """Swap every projection of the decoder layers for a bitsandbytes NF4 Linear4bit (QLoRA's base)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name not in TARGETS:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                                      device="meta")  # its weight is replaced: no fp32 init of a 7B model on the CPU
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4").to(lin.weight.device)
                setattr(parent, name, q)
    torch.cuda.empty_cache()


def _resident_bytes(p: torch.Tensor) -> int:
    """Bytes a parameter holds: its packed form once lowra released it, else its own storage."""
    packed = packed_weight(p)
    return packed.nbytes() if packed is not None else p.untyped_storage().nbytes()


def run_variant(variant: str, quick: bool, inner: str | None, mixtral: bool = False) -> dict:
    from peft import LoraConfig, get_peft_model

    device, dtype = device_and_dtype(quick)
    cuda = device.type == "cuda"
    model = build_model(quick, device, dtype, mixtral)
    if variant.startswith("bnb"):
        to_nf4(model, dtype)
    targets = ATTENTION if mixtral else TARGETS
    config = LoraConfig(r=4 if quick else 64, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                        use_dora=variant.endswith("DoRA"))
    model = get_peft_model(model, config)
    # Checkpointing after get_peft_model: on a model already checkpointed, get_peft_model registers transformers'
    # input-requires-grad hook a second time and the first one's handle is lost, so no call removes it.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers adds an input-requires-grad hook; non-reentrant checkpointing does not need it, and
    # under torch.compile it breaks the graph before the first layer (the lowra plan would lose E[g^2]).
    model.disable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    step_model = model
    if variant.startswith("lowra"):
        options = {"bits": float(variant.split()[1]), "progress": False, **({"inner": inner} if inner else {})}
        step_model = torch.compile(model, backend="lowra", options=options)
    length = 32 if quick else 2048
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device, generator=torch.Generator(device).manual_seed(0))

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the first step's own peak, not the model's build
    first = step()
    first_peak = torch.cuda.max_memory_allocated() if cuda else 0
    step()  # a recompile (e.g. grad mode) would land here, not in the timed steps
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(2 if quick else 5)]
    out = {"variant": variant, "step_s": statistics.median(times), "first_step_s": first,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "first_step_peak_gib": first_peak / 2**30 if cuda else None,
           "trainable_params": sum(p.numel() for p in params), "tokens": length,
           "frozen_gib": sum(_resident_bytes(p) for p in model.parameters() if not p.requires_grad) / 2**30}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as checkpoint:
        model.save_pretrained(checkpoint)
    out["save_s"] = time.perf_counter() - t0
    out["save_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if variant.startswith("lowra"):
        out["compile_s"] = first - out["step_s"]  # the one-off: calibrate, quantize, plan, LoftQ, compile
        out["kernels"] = lowra_compile.codegen.kernel_log()
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {VARIANTS + DORA_VARIANTS}")
    p.add_argument("--dora", action="store_true", help=f"run {DORA_VARIANTS} instead of the LoRA variants")
    p.add_argument("--inner", help="the lowra backend's inner compiler (default: its own default)")
    p.add_argument("--model", choices=["llama-2-7b", "mixtral"], default="llama-2-7b")
    p.add_argument("--variant", help="run one variant in this process and print its result (used internally)")
    args = p.parse_args(argv)
    mixtral = args.model == "mixtral"
    if args.variant:
        print_result(run_variant(args.variant, args.quick, args.inner, mixtral))
        return
    device, _ = device_and_dtype(args.quick)
    variants = args.variants or [v for v in (DORA_VARIANTS if args.dora else VARIANTS)
                                 if not v.startswith("bnb") or (bnb_available() and not mixtral)]
    if args.quick:
        variants = [v for v in variants if not v.startswith(("bnb", "lowra 1.5"))]
    name = "train_step" + ("_mixtral" if mixtral else "") + ("_dora" if args.dora else "")
    name += "".join("_" + v.replace(" ", "-") for v in args.variants or [])
    rows, env = [], environment(device)
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model] + (["--quick"] if args.quick else [])
        cmd += ["--inner", args.inner or "aot_eager"] if args.quick else (["--inner", args.inner] if args.inner else [])
        row = variant_in_process(cmd, variant, timeout=VARIANT_TIMEOUT_S)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
        write_json(name, {"benchmark": "train_step", "model": args.model, "env": env, "quick": args.quick, "rows": rows},
                   args.out)  # after every row: a call cut off keeps the rows before


if __name__ == "__main__":
    main()
