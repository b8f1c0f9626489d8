"""Keep data-parallel replicas identical: one quantization for all ranks of a torch.distributed job.

Under DistributedDataParallel every rank compiles the same model on its own first batch. Left alone,
each rank would calibrate on its own tokens, plan and pack a different base, and LoftQ would start
different adapters (DDP broadcasts parameters once, when it wraps the model, before any of this): the
replicas would train different models on averaged gradients. So, when a process group of more than one
rank is initialised, the pipeline

    calibrate  ->  average_statistics: E[x^2], E[x x^T] (token-weighted; an expert's E[x^2] weighted by the
                                       tokens it took on each rank) and E[g^2] of all ranks, on every rank
    plan       ->  first_rank_plan:    rank 0's widths (a tie broken differently would change packed shapes)
    pack+LoftQ ->  share_first_rank:   rank 0's packed tensors and adapters, byte for byte

Every rank still does the quantization work (in the same time as one), and the plan sees the tokens of
every rank's batch. The collectives run in the order of the sites, which every rank shares because it
compiles the same graph.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from .calibrate import SiteStats


def replicated() -> bool:
    """True inside a torch.distributed job of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce_sum(t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The sum over ranks, reduced in `dtype` (counts in int64: float32 is exact only up to 2^24), into a copy:
    the all-reduce works in place, and `t` is the caller's."""
    on = t.to(_comm_device(), dtype, copy=True)
    dist.all_reduce(on)
    return on.to(t.device)


def average_statistics(stats: list[SiteStats | None]) -> list[SiteStats | None]:
    """Each site's statistics over the tokens of every rank (E[g^2]: the mean of the ranks' means, as for
    several calibration batches on one rank). E[g^2] is kept only if every rank has it (a rank whose batch
    had no labels has none): the ranks then make the same collectives and plan on the same weighting.

    A layer no token reached on some ranks (an expert their router never chose) comes with the stand-ins of
    `_from_layers_alike` there and no E[x x^T]: those ranks add zeros to the E[x x^T] of the ranks that have
    one (their share of the tokens is zero anyway), so every rank reduces the same tensors. Reached on no
    rank, it takes the mean of the ranks' stand-ins."""
    ranks = dist.get_world_size()
    has_g2 = any(s is not None and s.g2 is not None for s in stats)
    if int(_all_reduce_sum(torch.tensor([int(has_g2)]), torch.int64).item()) < ranks:
        stats = [None if s is None else dataclasses.replace(s, g2=None) for s in stats]
    with_gram = _all_reduce_sum(torch.tensor([s is not None and s.gram is not None for s in stats]), torch.int64)
    out: list[SiteStats | None] = []
    grams: dict[int, Tensor] = {}  # layers that read one input share its E[x x^T]: reduced once, still shared
    for s, gram_anywhere in zip(stats, with_gram.tolist()):
        if s is None:
            out.append(None)
            continue
        if s.gram is None and gram_anywhere:
            k = s.x2.shape[-1]
            s = dataclasses.replace(s, gram=torch.zeros(k, k, device=s.x2.device))
        tokens = int(_all_reduce_sum(torch.tensor([s.tokens]), torch.int64).item())
        share = s.tokens / tokens if tokens else 1 / ranks
        x2 = _all_reduce_sum(s.x2 * share)
        expert_tokens = None
        if s.expert_tokens is not None:  # each expert's mean over the tokens it took on every rank
            expert_tokens = _all_reduce_sum(s.expert_tokens, torch.int64)
            own = _all_reduce_sum(s.x2 * s.expert_tokens.to(s.x2)[:, None])
            # an expert no rank reached keeps the ranks' average of the pooled E[x^2] it was given
            reached = (expert_tokens > 0).to(x2.device)[:, None]
            x2 = torch.where(reached, own / expert_tokens.clamp_min(1).to(x2)[:, None], x2)
        if s.gram is not None and id(s.gram) not in grams:
            grams[id(s.gram)] = _all_reduce_sum(s.gram * share)
        gram = grams[id(s.gram)] if s.gram is not None else None
        g2 = _all_reduce_sum(s.g2) / ranks if s.g2 is not None else None
        out.append(SiteStats(x2, g2, gram, tokens, expert_tokens))
    return out


def _broadcast_bytes(tensors: list[Tensor]) -> None:
    """Overwrite `tensors` (same shapes and dtypes on every rank) with rank 0's values, in one broadcast."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).view(torch.uint8).to(_comm_device()) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel() * t.element_size()
            # a copy of its own: a slice at an offset its dtype's size does not divide cannot be viewed as it
            piece = flat[offset:offset + n].to(t.device, copy=True)
            t.copy_(piece.view(t.dtype).view(t.shape))
            offset += n


def first_rank_plan(bits: list[Tensor]) -> list[Tensor]:
    """Rank 0's widths per row, on every rank."""
    _broadcast_bytes(bits)
    return bits


def share_first_rank(weights: list[Tensor], adapters: list[Tensor]) -> None:
    """Give every rank rank 0's packed tensors of `weights` (each carrying its packed form) and `adapters`."""
    for weight in weights:
        _broadcast_bytes(list(weight._lowra_packed))
    _broadcast_bytes(adapters)
