"""A plain LoRA fine-tune loop: the unchanged user loop that the backend must support.

AdamW over the parameters that require grad, `loss.backward()`, fixed seeds. The demo and the accuracy
benchmark both use it, so every method sees the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .api import quantize_
from .config import LowRAConfig


def training_batches(windows: torch.Tensor, steps: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """`steps` batches of `batch_size` windows, drawn without replacement (reshuffled per epoch), seeded."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(windows), generator=g) for _ in range(-(-steps * batch_size // len(windows)))])
    return [windows[order[i * batch_size : (i + 1) * batch_size]] for i in range(steps)]


def quantize_on(
    model: torch.nn.Module, batches: torch.Tensor | Sequence[torch.Tensor], options: LowRAConfig | Mapping
) -> None:
    """Quantize `model` (not compiled yet) with `options`, calibrated on `batches` (token ids, or one tensor)
    as training batches with labels, in train mode: the loss gradient weighs the errors (the Fisher
    criterion). `lowra_compile.quantize_` runs them one at a time."""
    batches = [batches] if torch.is_tensor(batches) else batches
    model.train()
    quantize_(model, [{"input_ids": b, "labels": b, "use_cache": False} for b in batches], options)


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
