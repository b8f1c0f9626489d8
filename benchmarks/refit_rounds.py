"""What refitting the codebook to the error-feedback codes buys (option `refit_rounds`, passes/refit.py).

For the 15 SmolLM2-135M linears of `gptq_damping.py` at 1, 2, 3 and 4 bits, with E[x x^T] from 1k and 4k
KJV training tokens (damped by the rule), this packs each layer at one width with 0 to 3 refit rounds,
with fitted group scales (refitted: scales and levels) and with absmax scales (refitted: levels only),
and measures the output error ||(W - deq(W)) x||^2 on 8 held-out KJV windows, relative to no refit with
the same scales.

    python benchmarks/refit_rounds.py      # CPU, about 10 minutes

Results go to benchmarks/results/refit_rounds_<device>_<date>.json.
"""

from __future__ import annotations

import torch

from gptq_damping import damped_layers, held_out_error, layer_moments, write_layer_study

CALIBRATION_WINDOWS = (2, 8)  # of 512 tokens
BITS = (1, 2, 3, 4)
ROUNDS = (0, 1, 2, 3)
SCALES = {"fitted": True, "absmax": False}


def main() -> None:
    weights, calib, held = layer_moments(CALIBRATION_WINDOWS)
    rows, summary = [], {}
    for tokens, grams in calib.items():
        for scales, fit in SCALES.items():
            for bits in BITS:
                ratios = []
                for name, gram, factor in damped_layers(grams, tokens, f"{tokens} tokens, {scales} scales, {bits} bits"):
                    errors = [held_out_error(weights[name], gram.diagonal(), factor, held[name], bits, fit, r) for r in ROUNDS]
                    ratios.append([e / errors[0] for e in errors])
                    rows.append({"layer": name, "tokens": tokens, "scales": scales, "bits": bits,
                                 "vs_no_refit": dict(zip(map(str, ROUNDS), ratios[-1]))})
                key = f"{tokens} tokens, {scales} scales, {bits} bits"
                summary[key] = {"mean": dict(zip(map(str, ROUNDS), torch.tensor(ratios).mean(0).tolist())),
                                "worst": dict(zip(map(str, ROUNDS), torch.tensor(ratios).amax(0).tolist()))}
                print(key, "mean vs no refit", {r: round(m, 4) for r, m in summary[key]["mean"].items()})
    write_layer_study("refit_rounds", {"vs_no_refit": summary, "rows": rows})


if __name__ == "__main__":
    main()
