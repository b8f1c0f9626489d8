"""How much to damp E[x x^T] for error-feedback rounding, by calibration tokens (passes/gptq.py `damping`).

Error-feedback rounding fits the codes to the calibration inputs; judged on other inputs, too little
damping overfits a small batch and too much throws away what a large batch knows. For 15 linears of
SmolLM2-135M (q, v, o, up and down of blocks 3, 15 and 27) at 2 bits, this measures the output error
||(W - deq(W)) x||^2 on 8 held-out KJV windows, relative to nearest rounding, with E[x x^T] from
1, 4 or 16 thousand training tokens and each fixed damping, and with the tokens-aware rule.

    python benchmarks/gptq_damping.py      # CPU, about 5 minutes

Results go to benchmarks/results/gptq_damping_<device>_<date>.json.
"""

from __future__ import annotations

import datetime
import json

import torch
from tqdm.auto import tqdm

from bench_utils import RESULTS, device_name
from lowra_compile.finetune import training_batches
from lowra_compile.passes.gptq import damping, hessian_factor, output_error
from lowra_compile.passes.quantize import CodebookFit, assemble, quantize_layer
from lowra_compile.runtime.reference import dequantize
from lowra_compile.smollm import load_smollm2
from lowra_compile.texts import load_split, split_text, token_windows

KINDS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
LAYERS = [f"model.layers.{i}.{kind}" for i in (3, 15, 27) for kind in KINDS]
CALIBRATION_WINDOWS = (2, 8, 32)  # of 512 tokens
FIXED = (1.0, 0.3, 0.1, 0.03)
BITS, GROUP = 2, 64


@torch.no_grad()
def second_moments(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """E[x x^T] of every layer in LAYERS over all tokens of `windows`."""
    modules = dict(model.named_modules())
    sums, count = {}, 0

    def hook(name):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.t() @ x
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in LAYERS]
    for batch in windows.split(2):
        model(input_ids=batch)
        count += batch.numel()
    for h in handles:
        h.remove()
    return {name: s / count for name, s in sums.items()}


def layer_moments(calibration_windows) -> tuple[dict, dict, dict]:
    """For LAYERS of SmolLM2: the weights (float32), E[x x^T] of the first `w` training windows for each w
    in `calibration_windows` (keyed by tokens), and E[x x^T] on 8 held-out KJV windows."""
    model, tokenizer = load_smollm2()
    kjv = load_split("kjv")
    train = token_windows(tokenizer, split_text(kjv["train"]), 512)
    held = second_moments(model, token_windows(tokenizer, split_text(kjv["heldout"]), 512, 8))
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight.detach().float() for name in LAYERS}
    calib = {w * 512: second_moments(model, training_batches(train, 1, w)[0]) for w in calibration_windows}
    return weights, calib, held


def write_layer_study(name: str, results: dict) -> None:
    """Write a study over LAYERS to results/<name>_cpu_<date>.json, with the settings all of them share."""
    date = datetime.date.today().isoformat()
    head = {"device": device_name(torch.device("cpu")), "date": date, "group_size": GROUP, "held_out_windows": 8}
    out = RESULTS / f"{name}_cpu_{date}.json"
    out.write_text(json.dumps(head | results, indent=1))
    print(f"wrote {out}")


def damped_layers(grams: dict[str, torch.Tensor], tokens: int, desc: str):
    """(name, E[x x^T], its Hessian factor damped by the rule) for every layer of LAYERS, with a progress bar."""
    for name in tqdm(LAYERS, desc=desc):
        gram = grams[name]
        yield name, gram, hessian_factor(gram, damping(gram.shape[0], tokens))


def held_out_error(
    weight: torch.Tensor, x2: torch.Tensor, factor, held: torch.Tensor, bits: int = BITS, fit_scales: bool = False,
    refit_rounds: int = 0,
) -> float:
    """Output error on the held-out E[x x^T] of `weight` packed at `bits` (nearest rounding when `factor` is None)."""
    lq = quantize_layer(weight, (bits,), CodebookFit(GROUP, "lloyd", 12, fit_scales=fit_scales), x2, factor)
    packed = assemble(lq, weight, torch.full((weight.shape[0],), bits), factor, refit_rounds)
    delta = weight - dequantize(packed.tensors(), weight.shape[1], GROUP, torch.float32)
    return output_error(delta, held).sum().item()


def main() -> None:
    weights, calib, held = layer_moments(CALIBRATION_WINDOWS)
    rows = []
    for tokens, grams in calib.items():
        for name in tqdm(LAYERS, desc=f"{tokens} tokens"):
            weight, gram = weights[name], grams[name]
            nearest = held_out_error(weight, gram.diagonal(), None, held[name])
            rule = damping(gram.shape[0], tokens)
            ratios = {
                str(d): held_out_error(weight, gram.diagonal(), hessian_factor(gram, d), held[name]) / nearest
                for d in (*FIXED, rule)
            }
            rows.append({"layer": name, "tokens": tokens, "rule_damp": rule, "vs_nearest": ratios})
    for row in rows:  # how far each choice is from the best fixed damping of that layer and size
        best = min(row["vs_nearest"][str(d)] for d in FIXED)
        row["vs_best_fixed"] = {"rule": row["vs_nearest"][str(row["rule_damp"])] / best} | {
            str(d): row["vs_nearest"][str(d)] / best for d in FIXED
        }
    worst = {key: max(r["vs_best_fixed"][key] for r in rows) for key in rows[0]["vs_best_fixed"]}
    print("worst ratio to the best fixed damping:", {k: round(v, 3) for k, v in worst.items()})
    write_layer_study("gptq_damping", {"bits": BITS, "worst_vs_best_fixed": worst, "rows": rows})


if __name__ == "__main__":
    main()
