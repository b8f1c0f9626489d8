"""Time to quantize and plan a whole model: SmolLM2-135M-shaped on CPU, Llama-2-7B-shaped on GPU (issue 4).

Runs the backend's own passes layer by layer on random weights of the model's linear shapes, exactly as
the first compiled call does: weighted Lloyd-Max codebooks at every allowed width, the whole-model
plan, then packing at the planned widths. Quantization time does not depend on trained values, so
random weights (and random positive calibration statistics) give the real cost without a download.
Target: 7B in under 2 minutes on one H100 (the paper reports ~10 minutes for LLaMA-2-7B).

    python benchmarks/plan_speed.py                  # 135M on CPU, and 7B when CUDA is present
    python benchmarks/plan_speed.py --model llama-2-7b --device cuda
    python benchmarks/plan_speed.py --rounding gptq  # error-feedback rounding (a random E[x x^T] per layer input)
    python benchmarks/plan_speed.py --rounding gptq --refit-rounds 2   # and scales and levels refitted to the codes
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
import triton
from tqdm.auto import tqdm

from bench_utils import RESULTS, code_digest, device_name
from lowra_compile.config import SCALES, LowRAConfig
from lowra_compile.passes.gptq import LatestFactor
from lowra_compile.passes.pipeline import codebook_fit, device_clock
from lowra_compile.passes.plan import plan_bits
from lowra_compile.passes.quantize import assemble, quantize_layer

# (hidden, intermediate, layers, attention heads, key/value heads) of the two model shapes
MODELS = {"smollm2-135m": (576, 1536, 30, 9, 3), "llama-2-7b": (4096, 11008, 32, 32, 32)}


def linear_shapes(model: str) -> list[tuple[int, int, int]]:
    """(out_features, in_features, input) of every q/k/v/o/gate/up/down projection (lm_head stays dense);
    `input` numbers the distinct layer inputs: q/k/v read one, gate/up another."""
    hidden, inter, layers, heads, kv_heads = MODELS[model]
    kv = hidden // heads * kv_heads
    per_layer = [(hidden, hidden, 0), (kv, hidden, 0), (kv, hidden, 0), (hidden, hidden, 1), (inter, hidden, 2),
                 (inter, hidden, 2), (hidden, inter, 3)]
    return [(n, k, 4 * block + x) for block in range(layers) for n, k, x in per_layer]


def _input_gram(k: int, seed: int, device: torch.device) -> torch.Tensor:
    """A random E[x x^T] of 256 tokens, the same for every call with the same seed (built again to pack)."""
    g = torch.Generator(device).manual_seed(seed)
    scale = (torch.rand(k, generator=g, device=device) + 0.5).sqrt()
    tokens = torch.randn(256, k, generator=g, device=device) * scale
    return tokens.t() @ tokens / 256


def time_model(model: str, device: torch.device, config: LowRAConfig) -> dict:
    """Seconds to quantize every layer at every width, to plan, and to pack, plus the plan's bits."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = linear_shapes(model)
    g = torch.Generator(device).manual_seed(0)
    gptq = config.rounding == "gptq"
    layers, errors, seconds, latest = [], [], {"quantize": 0.0}, LatestFactor()

    def factor(k: int, input_id: int):  # as the backend: one factor per distinct input, only the latest kept
        return latest(input_id, lambda: _input_gram(k, input_id, device), 256) if gptq else None

    # Untimed first: each distinct layer shape once, quantized and packed, so that the timings below leave out
    # the one-off builds of the Triton kernels (on CUDA) and first-call overheads; their seconds are kept apart.
    t0 = device_clock(device)
    for n, k in dict.fromkeys((n, k) for n, k, _ in shapes):
        weight = (torch.randn(n, k, device=device) * 0.02).to(dtype)
        warm = latest(("warm-up", k), lambda: _input_gram(k, 0, device), 256) if gptq else None
        x2 = warm.gram.diagonal() if gptq else torch.rand(k, device=device) + 0.5
        lq = quantize_layer(weight, config.allowed_bits, codebook_fit(config), x2, warm)
        every_width = torch.tensor(config.allowed_bits).repeat(n)[:n]  # rows take the widths in turn
        assemble(lq, weight, every_width, warm, config.refit_rounds)
    warmup_s = device_clock(device) - t0
    for n, k, input_id in tqdm(shapes, desc=f"{model}: quantize", unit="layer"):
        weight = (torch.randn(n, k, generator=g, device=device) * 0.02).to(dtype)
        x2 = torch.rand(k, generator=g, device=device) + 0.5  # stands in for E[x^2] from a batch
        g2 = torch.rand(n, generator=g, device=device) + 0.5  # and E[g^2]
        t0 = device_clock(device)
        layer_factor = factor(k, input_id)  # the random E[x x^T] is built inside the timing
        x2 = layer_factor.gram.diagonal() if gptq else x2
        lq = quantize_layer(weight, config.allowed_bits, codebook_fit(config), x2, layer_factor)
        errors.append(lq.error * g2[:, None])
        seconds["quantize"] += device_clock(device) - t0
        layers.append((lq, weight, k, input_id))  # 7B in bf16 is ~13 GB: kept on the GPU for packing
    t0 = device_clock(device)
    bits = plan_bits(errors, [k for _, k, _ in shapes], config.allowed_bits, config.bits)
    seconds["plan"] = device_clock(device) - t0
    t0 = device_clock(device)
    packed = [
        assemble(lq, weight, b, factor(k, input_id), config.refit_rounds)
        for (lq, weight, k, input_id), b in zip(layers, bits)
    ]
    seconds["pack"] = device_clock(device) - t0
    weights = sum(n * k for n, k, _ in shapes)
    return {
        "model": model,
        "device": device_name(device),
        "layers": len(shapes),
        "weights": weights,
        "rows": sum(n for n, _, _ in shapes),
        "budget": config.bits,
        "bit_choices": config.allowed_bits,
        "rounding": config.rounding,
        "refit_rounds": config.refit_rounds,
        "scales": config.scales,
        "code_bits": sum(p.code_bits() * p.shape[0] * p.shape[1] for p in packed) / weights,
        "seconds": {**seconds, "total": sum(seconds.values())},
        "warmup_s": warmup_s,  # one layer per distinct shape before the timed run (kernel builds on CUDA)
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), help="default: 135M on CPU, plus 7B on CUDA when present")
    parser.add_argument("--device", help="cpu or cuda (default: cpu for 135M, cuda for 7B)")
    parser.add_argument("--bits", type=float, default=2.0)
    parser.add_argument("--rounding", default="nearest", choices=("nearest", "gptq"))
    parser.add_argument("--refit-rounds", type=int, default=0, help="with gptq: scales and levels refitted to the codes")
    parser.add_argument("--scales", default=LowRAConfig.scales, choices=SCALES, help="group scales (option scales)")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/plan_speed[_gptq]_<devices>_<date>.json)")
    args = parser.parse_args(argv)
    config = LowRAConfig(bits=args.bits, rounding=args.rounding, refit_rounds=args.refit_rounds, scales=args.scales)
    runs = [("smollm2-135m", "cpu")] + ([("llama-2-7b", "cuda")] if torch.cuda.is_available() else [])
    if args.model:
        runs = [(args.model, args.device or ("cuda" if args.model == "llama-2-7b" else "cpu"))]
    if any(device == "cuda" for _, device in runs) and not torch.cuda.is_available():
        parser.error("this run needs a CUDA GPU (7B: the shapes of Llama-2-7B; --device cpu runs it on the CPU, slowly)")
    date = datetime.date.today().isoformat()
    result = {"date": date, "torch": torch.__version__, "triton": triton.__version__, "code": code_digest(),
              "host": platform.processor() or platform.machine(), "runs": []}
    for model, device in runs:
        row = time_model(model, torch.device(device), config)
        print(json.dumps(row), flush=True)
        result["runs"].append(row)
    devices = "-".join(sorted({device for _, device in runs}))
    rounding = "" if args.rounding == "nearest" else f"_{args.rounding}"
    rounding += f"_refit{args.refit_rounds}" if args.refit_rounds else ""
    rounding += f"_{args.scales}" if args.scales != LowRAConfig.scales else ""
    out = args.out or RESULTS / f"plan_speed{rounding}_{devices}_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
