"""Does padding in the calibration batches hurt the quantization?

Fine-tuning batches are often right-padded. The backend calibrates on every position of its batches (it
sees activations, not the attention mask), so padded positions enter E[x²] and E[x xᵀ]; their loss
gradient is zero (labels -100), so they only dilute E[g²]. This quantizes SmolLM2-135M (with rank-16
adapters) at `--bits` on 4 batches of 2 KJV training windows and measures held-out KJV perplexity of the
quantized model (no fine-tune), two ways over the same real tokens:

    short   each row holds 256 real tokens, no padding
    padded  each row holds the same 256 real tokens, then 256 pad tokens (attention_mask 0, labels -100)

    python benchmarks/calibration_padding.py      # CPU, about 8 minutes

Results go to benchmarks/results/calibration_padding_<device>_<date>.json.
"""

from __future__ import annotations

import time

import torch
from bench_utils import environment, parser, write_json

import lowra_compile
from lowra_compile.demo import lora_model
from lowra_compile.perplexity import perplexity
from lowra_compile.smollm import load_smollm2
from lowra_compile.texts import load_split, split_text, token_windows

REAL, WINDOW, BATCHES, ROWS = 256, 512, 4, 2


def calibration_batches(train: torch.Tensor, padded: bool, pad_id: int) -> list[dict]:
    batches = []
    for b in range(BATCHES):
        ids = train[ROWS * b: ROWS * (b + 1)].clone()
        if not padded:
            ids = ids[:, :REAL]
            batches.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
            continue
        mask = torch.ones_like(ids)
        mask[:, REAL:] = 0
        ids[:, REAL:] = pad_id
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return batches


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--bits", type=float, default=2.0)
    ap.add_argument("--eval-windows", type=int, default=16)
    args = ap.parse_args()
    if args.quick:  # the shared parser offers it; this study has no smaller form (two quantizations of 135M)
        ap.error("--quick is not offered here: the study runs on the CPU in about 8 minutes as it is")
    split = load_split("kjv", seed=0)
    points = []
    for padded in (False, True):
        torch.manual_seed(0)
        model, tokenizer = load_smollm2()
        train = token_windows(tokenizer, split_text(split["train"]), WINDOW)
        heldout = token_windows(tokenizer, split_text(split["heldout"]), WINDOW, args.eval_windows)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        model = lora_model(model, 16, 0)
        start = time.perf_counter()
        lowra_compile.quantize_(model, calibration_batches(train, padded, pad_id), {"bits": args.bits, "progress": False})
        seconds = time.perf_counter() - start
        mode = "padded" if padded else "short"
        ppl = perplexity(model, heldout, desc=mode)
        points.append({"calibration": mode, "real_tokens": BATCHES * ROWS * REAL, "perplexity": ppl, "quantize_s": seconds})
        print(points[-1])
        torch._dynamo.reset()
    result = {"env": environment(torch.device("cpu")), "bits": args.bits, "eval_windows": args.eval_windows,
              "points": points, "padded_vs_short": points[1]["perplexity"] / points[0]["perplexity"]}
    write_json("calibration_padding", result, args.out)


if __name__ == "__main__":
    main()
