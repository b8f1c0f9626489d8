"""Would a width per input-column set pay? A study, not an option.

lowra plans one width per output row. In its own metric (squared error times absmax^2 * E[x^2]) an ideal
code would also move bits within a row, toward the input channels with large E[x^2]; the Shannon bound
says that is worth about 1 bit per weight at 1-4 bits, half of it from this within-row allocation alone
(`vector_bound.py`). The cheapest format that can do it splits each layer's input channels into a hot
set (the fraction f with the largest E[x^2]) and the rest, packs each set as a layer of its own (its
own rows' widths, codebooks, group scales and error-feedback rounding on its block of E[x x^T]), and
computes y = W_hot x_hot + W_cold x_cold. The plan spreads the same budget over all the parts of all
layers together, so a row may take 4 bits on its hot columns and 1 on the rest.

Measured as `rotation.py` measures (calibration on the reduced grid's 1,024 KJV tokens, fitted scales,
error-feedback rounding, the Fisher plan; quantized model only, no LoRA, no LoftQ; held-out perplexity
on 8 KJV and 8 Austen windows) at f = 0 (today's format), 1/8 and 1/4; then, on the dequantized
weights, the reduced grid's LoRA fine-tune (rank 16, 10 steps of 2 windows, lr 1e-3, adapters from
zero: no LoftQ for any f) and the same held-out perplexity again. Splitting loses error feedback
between the two sets (each is rounded on its own block of E[x x^T]); a format built on it would keep
one codebook per row and part, which `codebook_bits_per_weight` counts (fp16 levels).

    python benchmarks/column_split.py      # CPU, about 35 minutes

Results go to benchmarks/results/column_split_cpu_<date>.json.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from gptq_damping import write_layer_study
from lowra_compile.demo import lora_model
from lowra_compile.finetune import finetune, training_batches
from lowra_compile.passes.gptq import damping, hessian_factor
from lowra_compile.passes.plan import plan_bits
from lowra_compile.passes.quantize import assemble, quantize_layer
from lowra_compile.perplexity import perplexity
from lowra_compile.runtime.reference import dequantize
from rotation import FIT, calibrated_smollm2

BITS, GROUP = (1, 2, 3, 4), 64
FIT = FIT  # the default options: Lloyd-Max levels, fitted scales
FRACTIONS = {"one set": 0.0, "hot 1/8": 1 / 8, "hot 1/4": 1 / 4}
BUDGETS = (2.5, 2.0)
STEPS, RANK = 10, 16


def column_sets(x2: torch.Tensor, fraction: float) -> list[torch.Tensor]:
    """Input channel indices (ascending) of the hot set, the `fraction` with the largest E[x^2], and the rest."""
    if fraction == 0:
        return [torch.arange(len(x2))]
    hot = torch.zeros(len(x2), dtype=torch.bool)
    hot[x2.topk(round(fraction * len(x2))).indices] = True
    return [hot.nonzero().squeeze(1), (~hot).nonzero().squeeze(1)]


def main() -> None:
    model, linears, train, held, batch, grams, g2, dense = calibrated_smollm2()
    batches = training_batches(train, STEPS, 2)  # the reduced grid's fine-tune; its first batch is `batch`

    def finetuned(model: torch.nn.Module) -> dict:
        """Held-out perplexity and losses after the reduced grid's LoRA fine-tune of a copy of `model`."""
        tuned = lora_model(copy.deepcopy(model), RANK)
        losses = finetune(tuned, batches, lr=1e-3)
        return {"after_finetune": {c: perplexity(tuned, w) for c, w in held.items()}, "losses": losses}

    results = {"unquantized": {c: perplexity(model, w) for c, w in held.items()} | finetuned(model)}
    for label, fraction in FRACTIONS.items():
        parts = []  # (layer name, its input channels, weight, factor, candidates)
        for name in tqdm(linears, desc=f"quantize, {label}"):
            for cols in column_sets(grams[name].diagonal(), fraction):
                weight, gram = dense[name][:, cols], grams[name][cols][:, cols]
                factor = hessian_factor(gram, damping(len(cols), batch.numel()))
                parts.append((name, cols, weight, factor, quantize_layer(weight, BITS, FIT, gram.diagonal(), factor)))
        for budget in BUDGETS:
            plan = plan_bits([lq.error * g2[name][:, None] for name, _, _, _, lq in parts], [len(c) for _, c, *_ in parts], BITS, budget)
            rebuilt = {n: torch.empty_like(w) for n, w in dense.items()}
            for (name, cols, weight, factor, lq), rows in zip(parts, plan):
                rebuilt[name][:, cols] = dequantize(assemble(lq, weight, rows, factor, 0).tensors(), len(cols), GROUP, torch.float32)
            for name, weight in rebuilt.items():
                linears[name].weight.data = weight
            codebook_bits = sum((16 * 2.0**rows).sum().item() for rows in plan)
            ppl = {c: perplexity(model, w) for c, w in held.items()}
            # parts alternate hot, cold per layer when split (column_sets); one set: every part
            hot = [(rows.float().sum() * len(cols)).item() for (_, cols, *_), rows in zip(parts, plan)][:: 2 if fraction else 1]
            hot_weights = [len(rows) * len(cols) for (_, cols, *_), rows in zip(parts, plan)][:: 2 if fraction else 1]
            results[f"{label}, plan at {budget} bits"] = ppl | finetuned(model) | {
                "channels_at_1_2_3_4_bits": torch.cat(plan).bincount(minlength=5)[1:].tolist(),
                "mean_code_bits_of_hot_set": sum(hot) / sum(hot_weights),
                "codebook_bits_per_weight": codebook_bits / sum(w.numel() for w in dense.values()),
            }
            print(label, budget, results[f"{label}, plan at {budget} bits"], flush=True)
    write_layer_study("column_split", {"calibration_tokens": batch.numel(), "perplexity": results})


if __name__ == "__main__":
    main()
