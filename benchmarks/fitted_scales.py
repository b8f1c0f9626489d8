"""What fitting the group scales buys (option `scales`, passes/quantize.py), layer by layer.

For the 15 SmolLM2-135M linears of `gptq_damping.py` at 1, 2, 3 and 4 bits, with E[x x^T] from 1k and 4k
KJV training tokens (damped by the rule), this packs each layer at one width with absmax and with fitted
group scales (error-feedback rounding, as the backend does) and measures the output error
||(W - deq(W)) x||^2 on 8 held-out KJV windows, fitted relative to absmax.

    python benchmarks/fitted_scales.py      # CPU, about 3 minutes

Results go to benchmarks/results/fitted_scales_<device>_<date>.json.
"""

from __future__ import annotations

from gptq_damping import damped_layers, held_out_error, layer_moments, write_layer_study

CALIBRATION_WINDOWS = (2, 8)  # of 512 tokens
BITS = (1, 2, 3, 4)


def main() -> None:
    weights, calib, held = layer_moments(CALIBRATION_WINDOWS)
    rows, summary = [], {}
    for tokens, grams in calib.items():
        for bits in BITS:
            ratios = []
            for name, gram, factor in damped_layers(grams, tokens, f"{tokens} tokens, {bits} bits"):
                absmax, fitted = (held_out_error(weights[name], gram.diagonal(), factor, held[name], bits, fit) for fit in (False, True))
                ratios.append(fitted / absmax)
                rows.append({"layer": name, "tokens": tokens, "bits": bits, "fitted_vs_absmax": ratios[-1]})
            key = f"{tokens} tokens, {bits} bits"
            summary[key] = {"mean": sum(ratios) / len(ratios), "worst": max(ratios), "best": min(ratios)}
            print(key, {k: round(v, 4) for k, v in summary[key].items()})
    write_layer_study("fitted_scales", {"fitted_vs_absmax": summary, "rows": rows})


if __name__ == "__main__":
    main()
