"""A plain LoRA fine-tune loop: the unchanged user loop that the backend must support.

AdamW over the parameters that require grad, `loss.backward()`, fixed seeds. The demo and the accuracy
benchmark both use it, so every method sees the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .passes.calibrate import more_batches


def training_batches(windows: torch.Tensor, steps: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """`steps` batches of `batch_size` windows, drawn without replacement (reshuffled per epoch), seeded."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(windows), generator=g) for _ in range(-(-steps * batch_size // len(windows)))])
    return [windows[order[i * batch_size : (i + 1) * batch_size]] for i in range(steps)]


def quantize_on(model: torch.nn.Module, batches: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Make the first of `batches` (token ids, or one tensor) the compiled model's first call, in train mode
    with labels; the backend calibrates on it and on the others too (same shapes), one at a time.

    The backend quantizes on that first call; a call that returns a loss lets it weigh errors by the loss
    gradient (the Fisher criterion), so they should be training batches.
    """
    batches = [batches] if torch.is_tensor(batches) else batches
    calls = [{"input_ids": b, "labels": b, "use_cache": False} for b in batches]
    model.train()
    with more_batches(calls[0], calls[1:]):
        model(**calls[0])  # output dropped: only the quantization side effect is wanted


def finetune(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    lr: float = 1e-3,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    desc: str = "fine-tune",
) -> list[float]:
    """Train the parameters that require grad on `batches` (causal LM loss); returns the loss per step."""
    torch.manual_seed(seed)  # LoRA dropout
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    bar = tqdm(batches, desc=desc)
    for batch in bar:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
