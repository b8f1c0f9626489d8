"""Would training the codebooks and group scales alongside the adapters pay? A study, not an option.

At 2.5 bits lowra's error after quantization is smaller than NF 4-bit's, but it is spread over all
directions, where a rank-16 adapter cannot reach it, while NF's lies in a few input directions the
adapter undoes (docs/accuracy.md, "Why the fine-tune favours NF 4-bit"). A correction that is not of low
rank but costs almost nothing to store is already in the format: each row's 2^b levels and each
64-group's scale. Trained with the adapters (same optimizer, learning rate and steps), they move every
weight of a row or group at once, a high-rank change the adapter cannot make.

Measured as `column_split.py` measures: calibration on the reduced grid's 1,024 KJV tokens, fitted
scales, error-feedback rounding, the Fisher plan at 2.5 and 2.0 bits; then the reduced grid's LoRA
fine-tune (rank 16, 10 steps of 2 windows, lr 1e-3, adapters from zero, no LoftQ) on the dequantized
weights, with the levels, the scales, both or neither trainable; NF 4-bit (64-blocks, double-quantized
absmax, the grid's `nf` options) with neither and with its scales trainable, as the reference the 2.5-bit
target names. Held-out perplexity on 8 KJV and 8 Austen windows after the fine-tune.

    python benchmarks/trainable_codebooks.py      # CPU, about 40 minutes

Results go to benchmarks/results/trainable_codebooks_cpu_<date>.json.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from gptq_damping import write_layer_study
from lowra_compile.demo import lora_model
from lowra_compile.finetune import finetune, training_batches
from lowra_compile.passes.gptq import damping, hessian_factor
from lowra_compile.passes.plan import plan_bits
from lowra_compile.passes.quantize import CodebookFit, assemble, quantize_layer, quantize_rows
from lowra_compile.perplexity import perplexity
from lowra_compile.runtime.format import BIT_WIDTHS, dequantize_absmax, unpack_codes
from rotation import FIT, calibrated_smollm2

BITS, GROUP = (1, 2, 3, 4), 64
FIT = FIT  # the default options: Lloyd-Max levels, fitted scales
BUDGETS = (2.5, 2.0)
TRAINABLE = {"adapters only": (), "+ levels": ("levels",), "+ scales": ("scale",), "+ levels and scales": ("levels", "scale")}
STEPS, RANK = 10, 16


class CodebookWeight(torch.nn.Module):
    """A linear's weight rebuilt from its codes, per-row levels and per-group scales, so that the levels
    and scales can be trained: W[n, k] = levels[n, codes[n, k]] * scale[n, k // group]."""

    def __init__(self, packed: list[Tensor], k: int):
        super().__init__()
        perm, absmax_codes, absmax_scale, *groups = packed
        n, rows = perm.shape[0], perm.long()
        codes = torch.empty(n, k, dtype=torch.long)
        levels = torch.zeros(n, 16)
        start = 0
        for i, bits in enumerate(BIT_WIDTHS):
            words, codebook = groups[2 * i], groups[2 * i + 1]
            end = start + words.shape[0]
            if end == start:
                continue
            codes[rows[start:end]] = unpack_codes(words, bits, k)
            levels[rows[start:end], : 2**bits] = codebook.float()
            start = end
        scale = torch.empty(n, absmax_codes.shape[1])
        scale[rows] = dequantize_absmax(absmax_codes, absmax_scale)
        self.k = k
        self.register_buffer("codes", codes)
        self.levels = torch.nn.Parameter(levels, requires_grad=False)
        self.scale = torch.nn.Parameter(scale, requires_grad=False)

    def forward(self, _: Tensor) -> Tensor:
        return self.levels.gather(1, self.codes) * self.scale.repeat_interleave(GROUP, 1)[:, : self.k]


def main() -> None:
    model, linears, train, held, batch, grams, g2, dense = calibrated_smollm2()
    batches = training_batches(train, STEPS, 2)  # the reduced grid's fine-tune; its first batch is `batch`
    names = list(linears)

    def finetuned(packed: dict[str, list[Tensor]], trainable: tuple[str, ...]) -> dict:
        """Held-out perplexity after the reduced grid's fine-tune of a copy of the model whose linears are
        `packed`, with the codebook parts named in `trainable` trained alongside the adapters."""
        quantized = copy.deepcopy(model)
        modules = dict(quantized.named_modules())
        for name in names:
            parametrize.register_parametrization(modules[name], "weight", CodebookWeight(packed[name], dense[name].shape[1]), unsafe=True)
        tuned = lora_model(quantized, RANK)
        for p_name, p in tuned.named_parameters():
            if p_name.rsplit(".", 1)[-1] in trainable:
                p.requires_grad_(True)
        before = {c: perplexity(tuned, w) for c, w in held.items()}
        losses = finetune(tuned, batches, lr=1e-3)
        extra = sum(p.numel() for n, p in tuned.named_parameters() if p.requires_grad and "lora_" not in n)
        return {"quantized": before, "after_finetune": {c: perplexity(tuned, w) for c, w in held.items()}, "losses": losses, "extra_trainable": extra}

    results = {}
    nf4 = {n: quantize_rows(dense[n], torch.full((dense[n].shape[0],), 4), CodebookFit(GROUP, "nf", 0)).tensors() for n in names}
    for label, trainable in {"adapters only": (), "+ scales": ("scale",)}.items():
        results[f"nf 4-bit, {label}"] = finetuned(nf4, trainable)
        print("nf 4-bit", label, results[f"nf 4-bit, {label}"]["after_finetune"], flush=True)
    candidates = {}
    for name in tqdm(names, desc="quantize"):
        factor = hessian_factor(grams[name], damping(dense[name].shape[1], batch.numel()))
        candidates[name] = (factor, quantize_layer(dense[name], BITS, FIT, grams[name].diagonal(), factor))
    for budget in BUDGETS:
        plan = plan_bits([candidates[n][1].error * g2[n][:, None] for n in names], [dense[n].shape[1] for n in names], BITS, budget)
        packed = {n: assemble(candidates[n][1], dense[n], rows, candidates[n][0], 0).tensors() for n, rows in zip(names, plan)}
        for label, trainable in TRAINABLE.items():
            results[f"lowra {budget}, {label}"] = finetuned(packed, trainable)
            print(budget, label, results[f"lowra {budget}, {label}"]["after_finetune"], flush=True)
    write_layer_study("trainable_codebooks", {"calibration_tokens": batch.numel(), "perplexity": results})


if __name__ == "__main__":
    main()
