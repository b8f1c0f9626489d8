"""The user's model inside the wrappers a training loop puts around it.

`torch.compile(model)` returns an `OptimizedModule` holding the model as `_orig_mod`, and
`DistributedDataParallel(model)` holds it as `module` (`torch.compile(DDP(model))` both). Their parameter
names carry those prefixes (`_orig_mod.module.layers.0...`); the report, checkpoints and merge speak of the
model's own names and act on the model itself.
"""

from __future__ import annotations

import torch


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside every torch.compile and DistributedDataParallel wrapper around `model`."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
