"""What refitting the levels to the error-feedback codes buys (option `refit_rounds`, passes/gptq.py).

For the 15 SmolLM2-135M linears of `gptq_damping.py` at 2 and 3 bits, with E[x x^T] from 1k and 4k
KJV training tokens (damped by the rule), this packs each layer with 0, 1 and 2 refit rounds and
measures the output error ||(W - deq(W)) x||^2 on 8 held-out KJV windows, relative to no refit.

    python benchmarks/refit_levels.py      # CPU, about 2 minutes

Results go to benchmarks/results/refit_levels_<device>_<date>.json.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from gptq_damping import GROUP, LAYERS, layer_moments, write_layer_study
from lowra_compile.passes.gptq import damping, hessian_factor, output_error
from lowra_compile.passes.quantize import assemble, quantize_layer
from lowra_compile.runtime.reference import dequantize

CALIBRATION_WINDOWS = (2, 8)  # of 512 tokens
ROUNDS = (0, 1, 2)


def held_out_errors(weight: torch.Tensor, gram: torch.Tensor, tokens: int, bits: int, held: torch.Tensor) -> list[float]:
    factor = hessian_factor(gram, damping(gram.shape[0], tokens))
    lq = quantize_layer(weight, (bits,), GROUP, "lloyd", gram.diagonal(), 12, factor)
    errors = []
    for rounds in ROUNDS:
        packed = assemble(lq, weight, torch.full((weight.shape[0],), bits), factor, rounds)
        delta = weight - dequantize(packed.tensors(), weight.shape[1], GROUP, torch.float32)
        errors.append(output_error(delta, held).sum().item())
    return errors


def main() -> None:
    weights, calib, held = layer_moments(CALIBRATION_WINDOWS)
    rows, summary = [], {}
    for tokens, grams in calib.items():
        for bits in (2, 3):
            ratios = []
            for name in tqdm(LAYERS, desc=f"{tokens} tokens, {bits} bits"):
                errors = held_out_errors(weights[name], grams[name], tokens, bits, held[name])
                ratios.append([e / errors[0] for e in errors])
                rows.append({"layer": name, "tokens": tokens, "bits": bits, "vs_no_refit": dict(zip(map(str, ROUNDS), ratios[-1]))})
            mean = torch.tensor(ratios).mean(0).tolist()
            summary[f"{tokens} tokens, {bits} bits"] = dict(zip(map(str, ROUNDS), mean))
            print(f"{tokens} tokens, {bits} bits: mean held-out error vs no refit", {r: round(m, 4) for r, m in zip(ROUNDS, mean)})
    write_layer_study("refit_levels", {"mean_vs_no_refit": summary, "rows": rows})


if __name__ == "__main__":
    main()
