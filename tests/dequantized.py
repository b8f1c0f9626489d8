"""The check most backend tests share: a model compiled with lowra trains as the same model on its
dequantized weights (same loss, same gradients for every trainable parameter)."""

import copy

import torch


def matches_the_reference(loss: torch.Tensor, model: torch.nn.Module, reference: torch.nn.Module, data: dict,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """`loss` and the gradients its backward left on `model`'s trainable parameters are those of `reference` on
    `data` (its forward starts from `seed`, as the caller's should, so dropout draws the same masks). Returns
    `model`'s gradients by name."""
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


def step_matches_the_dequantized_model(compiled, model: torch.nn.Module, data: dict,
                                       seed: int = 0) -> dict[str, torch.Tensor]:
    """One step of `compiled` (`model`, already quantized) against a deep copy of `model` (dequantized weights,
    the same adapters), both forwards from `seed`. Returns the compiled model's gradients by name."""
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    torch.manual_seed(seed)
    loss = compiled(**data).loss
    loss.backward()
    return matches_the_reference(loss, model, reference, data, seed)


def assert_trains_as_dequantized(model: torch.nn.Module, data: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Compile `model` with lowra (2 bits, eager glue), run the first step (it quantizes), then check a second
    step with `step_matches_the_dequantized_model`. Returns the compiled model's gradients by name."""
    compiled = torch.compile(model, backend="lowra", options={"bits": 2.0, "progress": False, "inner": "eager"})
    compiled(**data).loss.backward()
    return step_matches_the_dequantized_model(compiled, model, data, seed)
