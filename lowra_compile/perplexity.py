"""Held-out perplexity of a causal LM over fixed token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over every predicted token of `windows` ([n, window] token ids).

    The NLL is summed from the logits here rather than taken from the model's `.loss`, so the value is
    exact whatever the batch split and whatever loss reduction a model uses. A short last batch is
    padded with copies of its first window (their logits dropped), so that every batch has one shape and a
    compiled model compiles one graph, not a second with a dynamic batch size. The model's train/eval
    mode is restored afterwards (a compiled model recompiles per mode, quantizing nothing again).
    """
    if windows.dim() != 2 or not len(windows) or windows.shape[1] < 2:
        raise ValueError(f"lowra: perplexity of windows {tuple(windows.shape)}: no token to predict (give [n, window] "
                         "token ids, n >= 1, window >= 2)")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False):
            ids = windows[start : start + batch_size]
            real = len(ids)
            padded = torch.cat([ids, ids[:1].expand(batch_size - real, -1)]) if start and real < batch_size else ids
            logits = model(input_ids=padded, use_cache=False).logits[:real, :-1].float()
            targets = ids[:, 1:].to(logits.device)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
