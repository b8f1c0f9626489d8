"""How much of each method's quantization error could a rank-16 adapter undo? A study of the fine-tune's reach.

On the full grid the same LoRA fine-tune takes NF 4-bit from 26.5 to 14.4 KJV perplexity (unquantized
20.2 -> 13.6) but lowra at 2.5 bits only from 28.3 to 16.0: quantized, lowra 2.5 is 6.6% behind NF 4-bit,
fine-tuned 11%. This measures one explanation: where each method's error lies. For a linear with weight
error dW [N, K], input second moment H = E[x x^T] = L L^T and output-gradient second moment g2 = E[g^2] [N],
the loss-weighted output error is

    T = sum_n g2[n] * (dW H dW^T)[n, n] = ||D dW L||_F^2,        D = diag(sqrt(g2))

and the best any rank-r change of the weight can remove is the sum of the top r squared singular values
of D dW L. An adapter of rank 16 on that layer reaches at most that share (a fine-tune finds less, and
the adapter also adapts to the text). LoftQ's plain SVD of dW (what lowra's adapters start from) removes
the share of T given as `loftq`. H and g2 come from 8 held-out windows of each corpus (not the
calibration batch, which error-feedback rounding was fitted to). Methods as the grid quantizes them:
NF and round-to-nearest at one width with absmax groups, lowra's plan (fitted scales, error-feedback
rounding, Fisher plan on the reduced grid's 1,024 calibration tokens) and the same plan rounded to nearest.

`subspace` is the share removed by dW V V^T, V the top 16 eigenvectors of the calibration batch's
E[x x^T]: an adapter with A = V^T can start there. The `deflated` methods test quantizing for that
adapter: codebooks and error-feedback rounding on (I - V V^T) E[x x^T] (I - V V^T), so that no bits are
spent on the directions the adapter takes; compare their error after `subspace` with lowra's after `loftq`.

    python benchmarks/error_rank.py      # CPU, about 25 minutes

Results go to benchmarks/results/error_rank_<device>_<date>.json.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from gptq_damping import write_layer_study
from lowra_compile.finetune import training_batches
from lowra_compile.passes.gptq import damping, hessian_factor
from lowra_compile.passes.plan import plan_bits
from lowra_compile.passes.quantize import CodebookFit, assemble, quantize_layer
from lowra_compile.runtime.reference import dequantize
from lowra_compile.smollm import load_smollm2
from lowra_compile.texts import load_split, split_text, token_windows
from rotation import FIT, moments

RANK, GROUP, BITS = 16, 64, (1, 2, 3, 4)
FIXED = {"nf 4": ("nf", 4), "nf 3": ("nf", 3), "rtn 4": ("uniform", 4)}
PLANNED = {"lowra 4.0": 4.0, "lowra 3.0": 3.0, "lowra 2.5": 2.5, "lowra 2.0": 2.0}
DEFLATED = {"lowra 3.0, deflated": 3.0, "lowra 2.5, deflated": 2.5, "lowra 2.0, deflated": 2.0}


def input_subspace(gram: torch.Tensor) -> torch.Tensor:
    """V [K, RANK]: the top RANK eigenvectors of E[x x^T], the input directions that carry most of the output."""
    return torch.linalg.eigh(gram).eigenvectors[:, -RANK:]


def deflated(gram: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(I - V V^T) E[x x^T] (I - V V^T): the input's second moment outside the adapter's subspace."""
    p = torch.eye(len(gram)) - v @ v.t()
    return p @ gram @ p


def weight_errors(dense: dict, grams: dict, g2: dict, tokens: int) -> dict[str, dict[str, torch.Tensor]]:
    """dW = dequantized - W of every layer for every method (see the module docstring)."""
    errors = {m: {} for m in [*FIXED, *PLANNED, "lowra 2.5, nearest", *DEFLATED]}
    gptq, nearest, outside = {}, {}, {}
    for name, w in tqdm(dense.items(), desc="quantize"):
        for method, (codebook, bits) in FIXED.items():
            lq = quantize_layer(w, (bits,), CodebookFit(GROUP, codebook, 0))
            packed = assemble(lq, w, torch.full((w.shape[0],), bits))
            errors[method][name] = dequantize(packed.tensors(), w.shape[1], GROUP, torch.float32) - w
        factor = hessian_factor(grams[name], damping(w.shape[1], tokens))
        gptq[name] = (factor, quantize_layer(w, BITS, FIT, grams[name].diagonal(), factor, keep_codes=True))
        nearest[name] = quantize_layer(w, BITS, FIT, grams[name].diagonal())
        gram = deflated(grams[name], input_subspace(grams[name]))
        factor = hessian_factor(gram, damping(w.shape[1], tokens))
        outside[name] = (factor, quantize_layer(w, BITS, FIT, gram.diagonal(), factor, keep_codes=True))
    sizes = [w.shape[1] for w in dense.values()]
    plans = {m: plan_bits([gptq[n][1].error * g2[n][:, None] for n in dense], sizes, BITS, b) for m, b in PLANNED.items()}
    plans["lowra 2.5, nearest"] = plan_bits([nearest[n].error * g2[n][:, None] for n in dense], sizes, BITS, 2.5)
    plans |= {m: plan_bits([outside[n][1].error * g2[n][:, None] for n in dense], sizes, BITS, b) for m, b in DEFLATED.items()}
    for method, plan in plans.items():
        for (name, w), rows in zip(dense.items(), plan):
            factor, lq = (None, nearest[name]) if "nearest" in method else (outside if "deflated" in method else gptq)[name]
            packed = assemble(lq, w, rows, factor)
            errors[method][name] = dequantize(packed.tensors(), w.shape[1], GROUP, torch.float32) - w
    return errors


def reach(dw: torch.Tensor, gram: torch.Tensor, g2: torch.Tensor, v: torch.Tensor) -> tuple[float, float, float, float]:
    """Loss-weighted output error T, what the best rank-RANK change removes, what LoftQ's SVD removes, and
    what dW V V^T removes (V: the calibration input's top directions, `input_subspace`)."""
    ridge = 1e-6 * gram.diagonal().mean()
    chol = torch.linalg.cholesky(gram + ridge * torch.eye(len(gram)))
    d = g2.sqrt()[:, None]
    weighted = d * dw @ chol
    total = weighted.square().sum().item()
    best = torch.linalg.svdvals(weighted)[:RANK].square().sum().item()
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    left = d * (dw - (u[:, :RANK] * s[:RANK]) @ vh[:RANK]) @ chol
    projected = d * (dw - dw @ v @ v.t()) @ chol
    return total, best, total - left.square().sum().item(), total - projected.square().sum().item()


def main() -> None:
    model, tokenizer = load_smollm2()
    model.eval().requires_grad_(False)
    train = token_windows(tokenizer, split_text(load_split("kjv")["train"]), 512)
    batch = training_batches(train, 1, 2)[0]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    grams, g2 = moments(model, linears, batch)
    held = {}
    for corpus in ("kjv", "austen"):
        windows = token_windows(tokenizer, split_text(load_split(corpus)["heldout"]), 512, 8)
        held[corpus] = moments(model, linears, windows)
    dense = {n: m.weight.detach().float().clone() for n, m in linears.items()}
    errors = weight_errors(dense, grams, g2, batch.numel())
    subspaces = {n: input_subspace(grams[n]) for n in dense}
    results = {}
    for method, per_layer in errors.items():
        for corpus, (h_grams, h_g2) in held.items():
            sums = torch.tensor(
                [reach(per_layer[n], h_grams[n], h_g2[n], subspaces[n]) for n in tqdm(dense, desc=f"{method}, {corpus}")]
            )
            total, best, loftq, projected = sums.sum(0).tolist()
            shares = {"best_rank16_share": best / total, "loftq_share": loftq / total, "subspace_share": projected / total}
            results[f"{method}, {corpus}"] = {"error": total} | shares
            print(method, corpus, f"error {total:.4g}", {k: round(v, 3) for k, v in shares.items()}, flush=True)
    write_layer_study("error_rank", {"calibration_tokens": batch.numel(), "rank": RANK, "reach": results})


if __name__ == "__main__":
    main()
