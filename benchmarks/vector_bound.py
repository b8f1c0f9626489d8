"""Could vector codebooks buy the bit that 2.5 bits lacks against NF 4-bit? A bound, measured on SmolLM2's weights.

After the best rank-16 correction, lowra at 2.5 bits leaves 3.4x NF 4-bit's loss-weighted error, and
lowra's own curve (2.5 -> 3.0 -> 4.0 bits) reaches NF 4-bit's remainder only at about 3.6 bits
(`error_rank.py`, docs/accuracy.md "Why the fine-tune favours NF 4-bit"): at equal rate, a better
quantizer would need about 1.1 bits of gain over lowra's per-channel scalar Lloyd-Max codebooks. Vector
codebooks (one code per d weights, 2^(R d) centroids) are the one lever of that kind left untried. This
measures what they can buy before building a format and kernels for them, on the 15 linears of
`gptq_damping.py` (q, v, o, up and down projections of blocks 3, 15 and 27), each weight normalised by
its 64-element group absmax (as lowra's codebooks see it), in plain squared error:

- `scalar, per row`: lowra's codebooks, 2^R Lloyd-Max levels per output row (12 iterations);
- `scalar, per layer`: one set of 2^R Lloyd-Max levels for the whole layer (lowra's fit on one row);
- `vector d=2` and `vector d=4`: one k-means codebook of 2^(R d) centroids per layer on runs of d
  consecutive weights of a row, started from the per-layer scalar codebook's product (so never worse
  than it), 20 iterations;
- `Shannon lower bound`: no code of R bits per weight, of any dimension, gets below
  D(R) = 2^(2 h) / (2 pi e) * 2^(-2 R) per weight for a source of differential entropy h (bits); h is
  estimated per layer from a histogram of the weights divided by their row's RMS, and the bound is
  scaled back by each row's mean square, so that it holds for codebooks that adapt to every row as
  lowra's do. It treats weights as independent draws; error-feedback rounding and the Fisher plan
  work on top of any of these codebooks.

The same in lowra's own metric, each weight's squared error times absmax^2 * E[x^2] of its group and
input channel (E[x^2] from the reduced grid's calibration batch, 1,024 KJV tokens): `scalar, per row,
weighted` is lowra's codebooks fitted to it, `scalar, per layer, weighted` one such codebook per layer,
and `Shannon lower bound, weighted` the bound for codes that know those weights, K * 2^(2 h) / (2 pi e) * 2^(-2 R) * (row mean square) * (geometric mean of the
row's weights) per row: with weights that differ, an ideal code spends more of a row's bits where they
are large, which one scalar codebook per row cannot; its equivalent bits are against the weighted
scalar codebooks.

Each method's error at rate R is turned into `equivalent bits`: the rate at which the per-row scalar
codebooks reach the same total error (log error interpolated linearly between 1, 2, 3 and 4 bits).
The gain is equivalent bits minus R. Codebook storage is reported as bits per weight beside it.

    python benchmarks/vector_bound.py      # CPU, about 2 minutes

Results go to benchmarks/results/vector_bound_<device>_<date>.json.
"""

from __future__ import annotations

import datetime
import json
import math
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from bench_utils import RESULTS, device_name
from gptq_damping import LAYERS
from lowra_compile.passes.quantize import _normalise, fit_levels, group_absmax
from rotation import calibrated_smollm2

GROUP, SCALAR_BITS, KMEANS_ITERS, CHUNK = 64, (1, 2, 3, 4), 20, 65536
VECTORS = {2: (1, 2, 3), 4: (1, 2)}  # dimension -> rates; 2^(R d) centroids (4,096 at d=4, R=3 is left out)
CODEBOOK_BITS = 16  # fp16 levels and centroids


def normalised(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W / group absmax, [N, K] in [-1, 1] (what lowra's codebooks are fitted to), and each element's absmax."""
    return _normalise(weight, GROUP, group_absmax(weight, GROUP))


def scalar_per_row(v: torch.Tensor, importance: torch.Tensor, bits: int) -> float:
    return fit_levels(v, importance, bits, "lloyd", 12)[1].sum().item()


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid of every point and its squared distance, in chunks of CHUNK points."""
    index, dist = [], []
    for chunk in points.split(CHUNK):
        d2 = torch.cdist(chunk, centroids).square()
        best = d2.min(1)
        index.append(best.indices)
        dist.append(best.values)
    return torch.cat(index), torch.cat(dist)


def kmeans(points: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """Centroids [C, d] after `iters` k-means steps on `points` [P, d]; empty cells keep their centroid."""
    for _ in range(iters):
        index, _ = nearest(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, index, points)
        counts = torch.zeros(len(centroids), dtype=points.dtype).index_add_(0, index, torch.ones_like(index, dtype=points.dtype))
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
    return centroids


def vector_error(v: torch.Tensor, dim: int, bits: int) -> float:
    """k-means error of runs of `dim` weights, 2^(bits * dim) centroids, started from the product of the
    per-layer scalar Lloyd-Max levels."""
    levels = kmeans(v.reshape(-1, 1), torch.linspace(-1, 1, 2**bits)[:, None], KMEANS_ITERS).squeeze(1)
    points = v.reshape(-1, dim)
    start = torch.cartesian_prod(*[levels] * dim).reshape(-1, dim)
    return nearest(points, kmeans(points, start, KMEANS_ITERS))[1].sum().item()


def entropy_bits(x: torch.Tensor, bins: int = 2048) -> float:
    """Differential entropy (bits) of the values of `x` from a histogram over their range."""
    lo, hi = x.min().item(), x.max().item()
    width = (hi - lo) / bins
    p = torch.histc(x, bins, lo, hi) / x.numel()
    p = p[p > 0]
    return -(p * torch.log2(p / width)).sum().item()


def shannon_bound(v: torch.Tensor, importance: torch.Tensor, bits: int) -> float:
    """Lower bound on the total `importance`-weighted squared error of any R-bit code that adapts its scale
    to every row and knows the weights (an all-ones `importance`: plain squared error)."""
    mean_square = v.square().mean(1)
    h = entropy_bits((v / mean_square.sqrt().clamp_min(1e-12)[:, None]).reshape(-1))
    geometric_mean = importance.clamp_min(1e-30).log().mean(1).exp()
    per_row = v.shape[1] * mean_square * geometric_mean
    return per_row.sum().item() * 2 ** (2 * h) / (2 * math.pi * math.e) * 2 ** (-2 * bits)


def equivalent_bits(error: float, scalar: dict[int, float]) -> float:
    """The rate at which the per-row scalar codebooks' total error equals `error` (log-linear between widths)."""
    rates = sorted(scalar)
    logs = [math.log2(scalar[b]) for b in rates]
    target = math.log2(error)
    for (b0, l0), (b1, l1) in zip(zip(rates, logs), zip(rates[1:], logs[1:])):
        if target >= l1 or b1 == rates[-1]:
            return b0 + (l0 - target) / (l0 - l1)
    raise AssertionError("unreachable")


def main() -> None:
    *_, grams, _, dense = calibrated_smollm2()
    weights = {name: dense[name].float() for name in LAYERS}
    totals: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    overhead: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    count = sum(w.numel() for w in weights.values())

    def add(method: str, bits: int, error: float, codebook_values: int) -> None:
        totals[method][bits] += error
        overhead[method][bits] += codebook_values * CODEBOOK_BITS / count

    for name, weight in tqdm(weights.items(), desc="layers"):
        v, absmax = normalised(weight)
        n, plain, weighted = v.shape[0], torch.ones_like(v), absmax.square() * grams[name].diagonal()[None, :]
        for bits in SCALAR_BITS:
            add("scalar, per row", bits, scalar_per_row(v, plain, bits), n * 2**bits)
            add("scalar, per layer", bits, scalar_per_row(v.reshape(1, -1), plain.reshape(1, -1), bits), 2**bits)
            add("Shannon lower bound", bits, shannon_bound(v, plain, bits), 0)
            add("scalar, per row, weighted", bits, scalar_per_row(v, weighted, bits), n * 2**bits)
            add("scalar, per layer, weighted", bits, scalar_per_row(v.reshape(1, -1), weighted.reshape(1, -1), bits), 2**bits)
            add("Shannon lower bound, weighted", bits, shannon_bound(v, weighted, bits), 0)
        for dim, rates in VECTORS.items():
            for bits in rates:
                add(f"vector d={dim}", bits, vector_error(v, dim, bits), 2 ** (bits * dim) * dim)

    def reference(method: str) -> dict[int, float]:
        return totals["scalar, per row, weighted" if method.endswith("weighted") else "scalar, per row"]

    results = {
        method: {
            str(bits): {
                "mean_square_error": error / count,
                "equivalent_bits": equivalent_bits(error, reference(method)),
                "gain_bits": equivalent_bits(error, reference(method)) - bits,
                "codebook_bits_per_weight": overhead[method][bits],
            }
            for bits, error in sorted(by_rate.items())
        }
        for method, by_rate in totals.items()
    }
    for method, by_rate in results.items():
        print(method, {b: round(r["gain_bits"], 3) for b, r in by_rate.items()})
    date = datetime.date.today().isoformat()
    out = RESULTS / f"vector_bound_cpu_{date}.json"
    head = {
        "device": device_name(torch.device("cpu")), "date": date, "group_size": GROUP, "layers": LAYERS,
        "weights": count, "calibration_tokens": 1024,
    }
    out.write_text(json.dumps(head | {"results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
