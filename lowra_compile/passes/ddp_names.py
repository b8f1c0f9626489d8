"""Packed weights left out of DistributedDataParallel's synchronisation.

DDP broadcasts rank 0's parameters when it wraps a model; a packed (released) weight would come back dense
for it. The model's `_ddp_params_and_buffers_to_ignore` names what DDP leaves alone.
"""

from __future__ import annotations

import torch

from .release import ReleasedWeight


def leave_out_of_ddp_sync(model: torch.nn.Module) -> None:
    """List `model`'s released weights in `_ddp_params_and_buffers_to_ignore`, the names DDP leaves alone.

    When DDP wraps a model it broadcasts rank 0's parameters, reading each with `detach()`: for a released
    weight a dense copy on the CPU, so the whole base came back dequantized at once (host memory of the dense
    model) and went over the wire, and a process group of NCCL alone refuses CPU tensors. They are frozen and
    the ranks already hold the same packed weights (`quantize_` shares rank 0's, `load_quantized` reads one
    file), so there is nothing to broadcast. The names are relative to `model`, the module DDP is expected to
    wrap; the user's own entries are kept, and a weight materialized again leaves the list, as do all of them
    from a copy of the model (`_NamesForDDP`)."""
    released = {name for name, p in model.named_parameters() if isinstance(p, ReleasedWeight)}
    # the model's own list: a PEFT model forwards unknown names inward
    ours = getattr(vars(model).get("_ddp_params_and_buffers_to_ignore"), "packed", None)
    if not released and ours is None:  # nothing listed, nothing to list
        return
    listed = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) - (ours or set())
    model._ddp_params_and_buffers_to_ignore = _NamesForDDP(sorted(listed | released), released)


class _NamesForDDP(list):
    """A model's `_ddp_params_and_buffers_to_ignore` holding the names of its packed weights (`packed`). A copy
    of the model (`torch.save`, `copy.deepcopy`) holds those weights dense, and trainable again they must be
    synchronised: the copy's list keeps only the user's own entries."""

    def __init__(self, names: list[str], packed: set[str]) -> None:
        super().__init__(names)
        self.packed = packed

    def __reduce_ex__(self, protocol):
        return list, ([name for name in self if name not in self.packed],)
