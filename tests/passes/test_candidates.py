import dataclasses
import threading
import time

import pytest
import torch

from lowra_compile.passes import candidates, quantize, release
from lowra_compile.passes.gptq import damping, hessian_factor
from lowra_compile.passes.quantize import CodebookFit, quantize_layer

from ..tiny_models import batch
from .layer_data import GROUP, correlated_inputs
from .test_pipeline import _first_step, _spy

FIT = CodebookFit(GROUP, "lloyd", 6, fit_scales=True)


def _layer(seed: int = 0):
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(seed))
    x = correlated_inputs(48, 96)
    gram = x.t() @ x / 96
    return w, gram.diagonal().clone(), hessian_factor(gram, damping(48, 96))


def _calls(monkeypatch) -> list:
    calls = []

    def counted(weight, choices, *args, **kwargs):
        calls.append(choices)
        return quantize_layer(weight, choices, *args, **kwargs)

    monkeypatch.setattr(candidates, "quantize_layer", counted)
    return calls


def _assert_same_width(a, b, bits: int, rtol: float = 0.0) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a.groups[bits], b.groups[bits]))
    assert torch.equal(a.levels[bits], b.levels[bits])
    ia, ib = a.bit_choices.index(bits), b.bit_choices.index(bits)
    torch.testing.assert_close(a.error[:, ia], b.error[:, ib], rtol=rtol, atol=0.0)


@pytest.mark.parametrize("fit_scales", [True, False])  # absmax scales: every width holds the same group tensors
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_a_saved_layer_loads_as_quantized_and_subsets_skip_quantizing(tmp_path, monkeypatch, rounding, fit_scales):
    w, x2, factor = _layer()
    factor = factor if rounding == "gptq" else None
    args = (dataclasses.replace(FIT, fit_scales=fit_scales), x2, factor)
    direct = quantize_layer(w, (1, 2, 3, 4), *args)
    calls = _calls(monkeypatch)
    first = candidates.quantize_layer_cached(tmp_path, w, (1, 2, 3, 4), *args)
    again = candidates.quantize_layer_cached(tmp_path, w, (2, 4), *args)
    assert calls == [(1, 2, 3, 4)]  # the second call loaded every width it asked for
    assert again.bit_choices == (2, 4) and again.error.shape == (24, 2)
    for bits in (1, 2, 3, 4):
        _assert_same_width(first, direct, bits)
    for bits in (2, 4):
        _assert_same_width(again, direct, bits)


def test_only_missing_widths_are_quantized_and_added(tmp_path, monkeypatch):
    w, x2, factor = _layer()
    args = (FIT, x2, factor)
    calls = _calls(monkeypatch)
    candidates.quantize_layer_cached(tmp_path, w, (2,), *args)
    both = candidates.quantize_layer_cached(tmp_path, w, (1, 2), *args)
    candidates.quantize_layer_cached(tmp_path, w, (1, 2), *args)
    assert calls == [(2,), (1,)]
    alone = quantize_layer(w, (1, 2), *args)
    # rows are rounded independently: a width quantized alone matches it quantized with others
    for bits in (1, 2):
        _assert_same_width(both, alone, bits, rtol=1e-5)


@pytest.mark.parametrize("change", ["weight", "x2", "gram", "group_size", "codebook", "lloyd_iters", "fit_scales"])
def test_any_change_of_the_inputs_misses(tmp_path, monkeypatch, change):
    w, x2, factor = _layer()
    calls = _calls(monkeypatch)
    candidates.quantize_layer_cached(tmp_path, w, (2,), FIT, x2, factor)
    fit = FIT
    if change == "weight":
        w = w.clone()
        w[3, 5] += 1e-3
    elif change == "x2":
        x2 = x2 * 1.001
    elif change == "gram":
        factor = hessian_factor(factor.gram * 1.001, damping(48, 96))
    else:
        other = {"group_size": 8, "codebook": "nf", "lloyd_iters": 7, "fit_scales": False}[change]
        fit = dataclasses.replace(FIT, **{change: other})
    candidates.quantize_layer_cached(tmp_path, w, (2,), fit, x2, factor)
    assert len(calls) == 2


def test_an_unreadable_file_is_quantized_again_with_a_warning(tmp_path, monkeypatch):
    w, x2, factor = _layer()
    args = (FIT, x2, factor)
    calls = _calls(monkeypatch)
    first = candidates.quantize_layer_cached(tmp_path, w, (2,), *args)
    (saved,) = tmp_path.iterdir()
    saved.write_bytes(saved.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match="cannot read the saved candidates") as caught:
        again = candidates.quantize_layer_cached(tmp_path, w, (2,), *args)
    assert len(calls) == 2 and len([w for w in caught if "cannot read" in str(w.message)]) == 1  # once, not per read
    _assert_same_width(again, first, 2)
    candidates.quantize_layer_cached(tmp_path, w, (2,), *args)  # replaced by a whole file: loads
    assert len(calls) == 2


def _packed(model) -> list:
    return [release.packed_weight(p) for p in model.parameters() if release.packed_weight(p) is not None]


def test_compiling_again_at_another_budget_plans_from_the_saved_candidates(tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    options = {"calibrate": "activation", "loftq_iters": 0, "candidates_dir": str(tmp_path)}
    _first_step({**options, "bits": 3.0}, batch(16))
    assert len(seen["choices"]) == 14 and len(list(tmp_path.iterdir())) == 14
    torch._dynamo.reset()
    cached = _first_step({**options, "bits": 2.0}, batch(16))
    assert len(seen["choices"]) == 14  # nothing quantized the second time
    torch._dynamo.reset()
    fresh = _first_step({**options, "bits": 2.0, "candidates_dir": None}, batch(16))
    for a, b in zip(_packed(cached), _packed(fresh), strict=True):
        assert a.rows_per_width() == b.rows_per_width()
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))


def test_saved_error_feedback_codes_are_read_back_instead_of_rounding_again(tmp_path, monkeypatch):
    w, x2, factor = _layer()
    args = (FIT, x2, factor)
    candidates.quantize_layer_cached(tmp_path, w, (1, 2, 3, 4), *args)
    loaded = candidates.quantize_layer_cached(tmp_path, w, (2, 3), *args)
    direct = quantize_layer(w, (2, 3), *args, keep_codes=True)
    assert set(loaded.codes) == {2, 3}
    for bits in (2, 3):
        assert torch.equal(loaded.codes[bits], direct.codes[bits])
    rounded = []
    monkeypatch.setattr(quantize, "gptq_codes", lambda *a: rounded.append(a) or pytest.fail("rounded again"))
    bits = torch.tensor([2, 3] * 12)
    packed = quantize.assemble(loaded, w, bits, factor)
    monkeypatch.undo()
    expected = quantize.assemble(dataclasses.replace(direct, codes=None), w, bits, factor)
    assert not rounded
    assert all(torch.equal(a, b) for a, b in zip(packed.tensors(), expected.tensors(), strict=True))
    nearest = candidates.quantize_layer_cached(tmp_path, w, (2,), FIT, x2)
    assert nearest.codes is None  # nearest rounding is cheap: nothing saved, nothing read


@pytest.mark.skipif(candidates.fcntl is None, reason="no file locks here")
def test_two_compiles_asking_for_one_layer_at_once_quantize_it_once(tmp_path, monkeypatch):
    # parallel processes sharing a directory (the accuracy grid's shards) must not each quantize the same
    # layer: the second waits for the first's lock and loads its file. Two threads hold separate locks as
    # two processes do (flock locks belong to the open file).
    w, x2, factor = _layer()
    args = (FIT, x2, factor)
    calls, inside = [], threading.Event()

    def slow(weight, choices, *a, **kw):
        calls.append(choices)
        inside.set()
        time.sleep(0.5)  # long enough for the other thread to ask while this one holds the lock
        return quantize_layer(weight, choices, *a, **kw)

    monkeypatch.setattr(candidates, "quantize_layer", slow)
    results = [None, None]

    def compile_layer(i: int) -> None:
        results[i] = candidates.quantize_layer_cached(tmp_path, w, (1, 2, 3, 4), *args)

    first = threading.Thread(target=compile_layer, args=(0,))
    first.start()
    assert inside.wait(10)
    compile_layer(1)
    first.join()
    assert calls == [(1, 2, 3, 4)]
    for bits in (1, 2, 3, 4):
        _assert_same_width(results[1], results[0], bits)
        assert torch.equal(results[1].codes[bits], results[0].codes[bits])
