"""Would rotating each layer's input in blocks of 64 (incoherence processing) pay? A study, not an option.

A Hadamard rotation with random signs, R = diag(s) * blockdiag(H_64), spreads every 64-group's largest
weights over the whole group, so the groups look alike and a codebook fits them better at 1-2 bits.
Since y = x W^T = (x R)(W R)^T, quantizing W R instead of W changes nothing else but the op's input, which
would be rotated on the fly (64 multiply-adds per input element). Before building that into the format
and kernels, this measures what it buys on SmolLM2-135M with everything else as the backend does it:
E[x x^T] and the Fisher weights E[g^2] from the reduced grid's calibration batch (2 KJV windows of 512
tokens), fitted group scales, error-feedback rounding, Lloyd-Max codebooks at 1-4 bits, the plan at 2.5
and 2.0 bits, and one width everywhere at 3 and 2 bits. Rotated layers quantize W R under R^T E[x x^T] R
and are rotated back to a dense weight for the measurement. Reported: held-out perplexity of the
quantized model (no LoRA, no LoftQ) on 8 KJV and 8 Austen windows, unrotated and with two sign seeds.

    python benchmarks/rotation.py      # CPU, about 25 minutes

Results go to benchmarks/results/rotation_<device>_<date>.json.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from gptq_damping import write_layer_study
from lowra_compile.finetune import training_batches
from lowra_compile.passes.gptq import damping, hessian_factor
from lowra_compile.passes.plan import plan_bits
from lowra_compile.passes.quantize import CodebookFit, assemble, quantize_layer
from lowra_compile.perplexity import perplexity
from lowra_compile.runtime.reference import dequantize
from lowra_compile.smollm import load_smollm2
from lowra_compile.texts import load_split, split_text, token_windows

BITS, GROUP, BLOCK = (1, 2, 3, 4), 64, 64
FIT = CodebookFit(GROUP, "lloyd", 12, fit_scales=True)  # the default options: Lloyd-Max levels, fitted scales
SETTINGS = {"one width, 3 bits": 3, "one width, 2 bits": 2, "plan, 2.5 bits": 2.5, "plan, 2.0 bits": 2.0}
ROTATIONS = {"none": None, "block 64, seed 0": 0, "block 64, seed 1": 1}


def block_rotation(k: int, seed: int) -> torch.Tensor:
    """diag(s) * blockdiag(H_64, ...): orthogonal [k, k], random signs s drawn from `seed`."""
    if k % BLOCK:
        raise ValueError(f"input size {k} is not a multiple of {BLOCK}")
    h = torch.ones(1, 1)
    while h.shape[0] < BLOCK:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    signs = torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1
    return torch.block_diag(*[h / BLOCK**0.5] * (k // BLOCK)) * signs[:, None]


def moments(model, linears: dict, batch: torch.Tensor) -> tuple[dict, dict]:
    """E[x x^T] of each linear's input and E[g^2] of its output gradient on one loss of `batch`."""
    grams, g2 = {}, {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            grams[name] = x.t() @ x / len(x)
            output.register_hook(lambda g: g2.__setitem__(name, g.reshape(-1, g.shape[-1]).float().square().mean(0)))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    model.model.embed_tokens.weight.requires_grad_(True)  # the only leaf needing a gradient: reaches every layer
    model(input_ids=batch, labels=batch).loss.backward()
    model.model.embed_tokens.weight.requires_grad_(False)
    for h in handles:
        h.remove()
    return grams, g2


def calibrated_smollm2() -> tuple:
    """SmolLM2 in eval mode, its decoder linears, the KJV training windows, 8 + 8 held-out windows of KJV and
    Austen, the reduced grid's calibration batch (its first training batch, 2 KJV windows), E[x x^T] and
    E[g^2] of every linear on it, and the dense weights."""
    model, tokenizer = load_smollm2()
    model.eval().requires_grad_(False)
    train = token_windows(tokenizer, split_text(load_split("kjv")["train"]), 512)
    held = {c: token_windows(tokenizer, split_text(load_split(c)["heldout"]), 512, 8) for c in ("kjv", "austen")}
    batch = training_batches(train, 1, 2)[0]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    grams, g2 = moments(model, linears, batch)
    dense = {n: m.weight.detach().clone() for n, m in linears.items()}
    return model, linears, train, held, batch, grams, g2, dense


def main() -> None:
    model, linears, _, held, batch, grams, g2, dense = calibrated_smollm2()
    results = {"unquantized": {c: perplexity(model, w) for c, w in held.items()}}
    for rotation, seed in ROTATIONS.items():
        candidates = {}
        for name in tqdm(linears, desc=f"quantize, rotation {rotation}"):
            k = dense[name].shape[1]
            r = torch.eye(k) if seed is None else block_rotation(k, seed)
            weight, gram = dense[name] @ r, r.t() @ grams[name] @ r
            factor = hessian_factor(gram, damping(k, batch.numel()))
            candidates[name] = (r, weight, factor, quantize_layer(weight, BITS, FIT, gram.diagonal(), factor))
        for setting, bits in SETTINGS.items():
            if isinstance(bits, int):
                plan = [torch.full((dense[n].shape[0],), bits) for n in linears]
            else:
                errors = [candidates[n][3].error * g2[n][:, None] for n in linears]
                plan = plan_bits(errors, [dense[n].shape[1] for n in linears], BITS, bits)
            for name, rows in zip(linears, plan):
                r, weight, factor, lq = candidates[name]
                packed = assemble(lq, weight, rows, factor, 0)
                linears[name].weight.data = dequantize(packed.tensors(), weight.shape[1], GROUP, torch.float32) @ r.t()
            channels = torch.cat(plan).bincount(minlength=5)[1:].tolist()
            ppl = {c: perplexity(model, w) for c, w in held.items()}
            results[f"{setting}, rotation {rotation}"] = ppl | {"channels_at_1_2_3_4_bits": channels}
            print(setting, rotation, {c: round(v, 3) for c, v in ppl.items()}, channels, flush=True)
    write_layer_study("rotation", {"calibration_tokens": batch.numel(), "perplexity": results})


if __name__ == "__main__":
    main()
