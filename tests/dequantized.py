"""The check most backend tests share: a model compiled with lowra trains as the same model on its
dequantized weights (same loss, same gradients for every trainable parameter)."""

import copy

import torch


def assert_trains_as_dequantized(model: torch.nn.Module, data: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Compile `model` with lowra (2 bits, eager glue), run the first step (it quantizes), then compare a second
    step's loss and gradients with a deep copy of the model (dequantized weights). Each forward starts from
    `seed`, so dropout draws the same masks in both. Returns the compiled model's gradients by name."""
    compiled = torch.compile(model, backend="lowra", options={"bits": 2.0, "progress": False, "inner": "eager"})
    compiled(**data).loss.backward()
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    torch.manual_seed(seed)
    loss = compiled(**data).loss
    loss.backward()
    torch.manual_seed(seed)
    ref_loss = reference(**data).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    return got
