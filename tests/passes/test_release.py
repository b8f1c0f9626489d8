"""`release` frees a weight's dense storage whatever holds it: its own storage (in place), a memory-mapped one
that cannot be resized, or a buffer or storage it shares with other tensors (left to them, unchanged)."""

import pytest
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


def _initialisers() -> dict:
    return {
        "mul_": lambda w: w.mul_(0.5),
        "normal_": torch.nn.init.normal_,
        "zeros_": torch.nn.init.zeros_,
        "setitem": lambda w: w.__setitem__(0, 0.0),
        "out=": lambda w: torch.add(w, 1.0, out=w),
        "foreach": lambda w: torch._foreach_mul_([w], 0.5),
        "iadd": lambda w: w.__iadd__(1.0),
    }


@pytest.mark.parametrize("write", list(_initialisers()))
def test_a_write_into_a_released_weight_is_refused_not_lost(write):
    # densified, the write landed in a dequantized copy and was dropped: model.apply(init) on a packed model
    # changed nothing, silently
    p = _released(torch.randn(8, 64))
    before = dequantized(p).clone()
    with pytest.raises(RuntimeError, match="cannot write into a quantized frozen weight"), torch.no_grad():
        _initialisers()[write](p)
    torch.testing.assert_close(dequantized(p), before, rtol=0, atol=0)


def test_reads_and_the_in_place_calls_a_module_makes_on_a_released_weight_still_work():
    p = _released(torch.randn(8, 64))
    torch.testing.assert_close(p.sum(), dequantized(p).sum())
    p.requires_grad_(False)
    p.share_memory_()
    assert isinstance(p, ReleasedWeight) and not p.requires_grad


@pytest.mark.parametrize("x", [torch.randn(3, 63), torch.randn(3, 8), torch.ones(3, 64, dtype=torch.long)],
                         ids=["narrower", "much narrower", "integer"])
def test_linear_of_an_input_the_weight_cannot_take_raises_as_for_a_dense_weight(x):
    # the packed op takes K from x and dequantizes to x's dtype: a narrower x read a truncated weight and an
    # integer x a weight rounded to zeros, with a result of the right shape
    p = _released(torch.randn(8, 64))
    with pytest.raises(RuntimeError) as dense:
        torch.nn.functional.linear(x, dequantized(p))
    with pytest.raises(RuntimeError) as packed:
        torch.nn.functional.linear(x, p)
    assert type(packed.value) is type(dense.value)


def test_wrapping_a_released_weight_again_gives_it_back_and_a_dense_value_a_parameter():
    # type(p)(value, requires_grad=...), how accelerate's set_module_tensor_to_device rebuilds a parameter, made
    # a ReleasedWeight without a packed form, which failed on its first read
    p = _released(torch.randn(8, 64))
    assert ReleasedWeight(p, requires_grad=False) is p
    with pytest.raises(RuntimeError, match="cannot train"):
        ReleasedWeight(p, requires_grad=True)
    dense = ReleasedWeight(torch.randn(8, 64), requires_grad=False)
    assert type(dense) is torch.nn.Parameter and not dense.requires_grad


def test_a_released_weight_wrapped_in_a_frozen_parameter_is_itself_and_in_a_trainable_one_is_refused():
    # Parameter(data) of a tensor subclass is data.detach(), which gave the dequantized CPU copy state_dict()
    # wants, so torch raised its own "requires that detach() returns an instance of the same type"
    p = _released(torch.randn(8, 64))
    assert torch.nn.Parameter(p, requires_grad=False) is p and not p.requires_grad
    with pytest.raises(RuntimeError, match=r"cannot train.*Parameter\(w, requires_grad=False\)"):
        torch.nn.Parameter(p)
    assert not p.requires_grad
    assert type(p.detach()) is torch.Tensor  # state_dict()'s read stays a dense copy


@pytest.mark.parametrize("flag", ["overwrite", "swap"])
@pytest.mark.parametrize("convert", ["double", "half", "same dtype"])
def test_a_model_with_a_released_weight_converts_under_torch_s_future_module_conversion_flags(flag, convert):
    # Module._apply wraps every converted weight in Parameter(...) under these flags: torch raised its own
    # detach() message (overwrite), or "Couldn't swap Linear.weight" (swap)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    p = model[0].weight = _released(torch.randn(8, 64))
    dense = dequantized(p).clone()
    dtype = {"double": torch.float64, "half": torch.float16, "same dtype": torch.float32}[convert]
    setter = getattr(torch.__future__, f"set_{flag}_module_params_on_conversion")
    setter(True)
    try:
        model.half() if convert == "half" else model.to(dtype)
    finally:
        setter(False)
    w = model[0].weight
    assert isinstance(w, ReleasedWeight) and w.dtype == dtype and not w.requires_grad
    assert w is p if flag == "swap" else True  # swap keeps the Parameter object; overwrite may replace it
    torch.testing.assert_close(dequantized(w), dense.to(dtype), rtol=0, atol=0)
    x = torch.randn(2, 64, dtype=dtype)
    torch.testing.assert_close(model(x), torch.nn.functional.linear(x, dense.to(dtype), model[0].bias))


@pytest.mark.parametrize("write", ["mul_", "copy_", "setitem", "normal_"])
def test_a_write_through_the_data_of_a_released_weight_is_refused_not_lost(write):
    # w.data was densified: a dequantized copy, into which w.data.mul_(...) (an initialiser's, a weight surgery's)
    # wrote and which was then dropped, silently
    p = _released(torch.randn(8, 64))
    before = dequantized(p).clone()
    writes = {"mul_": lambda d: d.mul_(0.5), "copy_": lambda d: d.copy_(torch.zeros(8, 64)),
              "setitem": lambda d: d.__setitem__(0, 1.0), "normal_": torch.nn.init.normal_}
    with pytest.raises(RuntimeError, match="cannot write"):
        writes[write](p.data)
    torch.testing.assert_close(dequantized(p), before, rtol=0, atol=0)


def test_reads_of_the_data_of_a_released_weight_read_its_packed_form_without_a_copy():
    p = _released(torch.randn(8, 64))
    data, dense, x = p.data, dequantized(p), torch.randn(3, 64)
    assert isinstance(data, ReleasedWeight) and not data.requires_grad and data.shape == p.shape
    assert data.data_ptr() == p.data_ptr() and data._lowra_packed is p._lowra_packed  # no dequantized copy
    torch.testing.assert_close(data.float(), dense, rtol=0, atol=0)
    torch.testing.assert_close(torch.nn.functional.linear(x, data), torch.nn.functional.linear(x, dense))
    data.copy_(dense)  # its own values, as load_state_dict writes them: accepted, as on the weight itself
    p.data = p.data
    assert isinstance(p, ReleasedWeight) and torch.equal(dequantized(p), dense)
    assert type(p.data.detach()) is torch.Tensor and type(p.data.clone()) is torch.Tensor


def test_unfreezing_a_model_names_the_parameters_it_unfroze_before_its_first_released_weight():
    # Module.requires_grad_(True) unfreezes parameter after parameter: the refusal at the first packed weight left
    # those before it (a frozen embedding) trainable, and the error did not say so. Their earlier flags are not
    # recorded anywhere, so they cannot be set back: the error names them and says what to do
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8, bias=False))
    model[0].requires_grad_(False)
    model[1].weight = _released(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match=r"cannot train.*stopped at '1\.weight', after setting requires_grad=True "
                                           r"on the 2 parameter\(s\) before it \('0\.weight', '0\.bias'\).*"
                                           r"Set those back.*materialize"):
        model.requires_grad_(True)
    assert not model[1].weight.requires_grad
    with pytest.raises(RuntimeError, match=r"stopped at 'weight', its first parameter: nothing was changed"):
        model[1].requires_grad_(True)
