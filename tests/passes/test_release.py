"""`release` frees a weight's dense storage whatever holds it: its own storage (in place), a memory-mapped one
that cannot be resized, or a buffer or storage it shares with other tensors (left to them, unchanged)."""

import torch
from safetensors.torch import load_file, save_file

from lowra_compile.passes.release import ReleasedWeight, attach, dequantized, release
from lowra_compile.runtime import random_packed_weight


def _released(data: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(data, requires_grad=False)
    packed = random_packed_weight(*p.shape)
    attach(p, packed)
    release(p)
    assert isinstance(p, ReleasedWeight) and p.untyped_storage().nbytes() == 0 and p.shape == (8, 64)
    return p


def test_a_memory_mapped_weight_is_released_and_dequantizes(tmp_path):
    save_file({"w": torch.randn(8, 64)}, tmp_path / "w.safetensors")
    mapped = load_file(tmp_path / "w.safetensors")["w"]  # how transformers' from_pretrained loads on the CPU
    assert not mapped.untyped_storage().resizable()
    p = _released(mapped)
    assert dequantized(p).shape == (8, 64)


def test_a_weight_sharing_a_buffer_leaves_the_other_tensors_their_values():
    buffer = torch.randn(2, 8, 64)
    other = buffer[1].clone()
    _released(buffer[0])
    assert buffer.untyped_storage().nbytes() == 2 * 8 * 64 * 4 and torch.equal(buffer[1], other)


def test_a_weight_alone_on_its_storage_frees_that_storage_in_place():
    p = torch.nn.Parameter(torch.randn(8, 64), requires_grad=False)
    storage = p.untyped_storage()._cdata
    attach(p, random_packed_weight(*p.shape))
    release(p)
    assert p.untyped_storage()._cdata == storage and p.untyped_storage().nbytes() == 0  # its memory, not a copy's


def test_a_weight_made_from_another_s_data_leaves_the_other_its_values():
    # head.weight = Parameter(embed.weight.data): two Parameters on one storage; freeing it in place took the
    # other's values with it, so a model tied that way could not release its head without losing its embedding
    embed = torch.nn.Parameter(torch.randn(8, 64), requires_grad=False)
    values = embed.detach().clone()
    _released(embed.data)
    assert embed.untyped_storage().nbytes() == 8 * 64 * 4 and torch.equal(embed, values)


def test_a_torch_without_the_storage_use_count_still_frees_the_weight_s_memory(monkeypatch):
    # the in-place check reads a private count of torch's; without it a weight moves to a storage of its
    # own first, and its old one goes with its last owner
    import gc
    import weakref

    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    data = torch.randn(8, 64)
    old = weakref.ref(data.untyped_storage())
    p = _released(data)
    del data
    gc.collect()
    assert old() is None and dequantized(p).shape == (8, 64)


def test_unfreezing_a_released_weight_is_refused_and_freezing_it_again_is_not(monkeypatch):
    # model.requires_grad_(True) ("now train everything") left packed weights requires_grad=True with no
    # gradient ever: the base stayed as it was while the loop believed it trained
    import pytest

    from lowra_compile.passes import release as release_module
    from lowra_compile.passes.release import materialize_weight

    p = _released(torch.randn(8, 64))
    module = torch.nn.Linear(64, 8, bias=False)
    module.weight = p
    for unfreeze in (lambda: module.requires_grad_(True), lambda: p.requires_grad_(), lambda: setattr(p, "requires_grad", True)):
        with pytest.raises(RuntimeError, match=r"weight of shape \(8, 64\) cannot train.*materialize"):
            unfreeze()
        assert not p.requires_grad
    with monkeypatch.context() as m:  # on the weight itself: `p.requires_grad = False` (PEFT's) set it on a copy
        m.setattr(release_module, "dequantized", lambda p: pytest.fail("dequantized"))
        module.requires_grad_(False)
        p.requires_grad = False
    materialize_weight(p)  # dense again: it may train
    module.requires_grad_(True)
    module(torch.randn(2, 64)).sum().backward()
    assert p.grad is not None and p.grad.shape == (8, 64)
