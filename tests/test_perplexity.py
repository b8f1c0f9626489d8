"""The accuracy harness: perplexity, the fine-tune loop, and the baselines' bits per weight."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import lowra_compile
from lowra_compile.finetune import finetune, quantize_on, training_batches
from lowra_compile.perplexity import perplexity

from .tiny_models import VOCAB, tiny_llama, tiny_peft_llama

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void. " * 3


def _windows(window: int = 32) -> torch.Tensor:
    ids = torch.tensor([ord(c) % VOCAB for c in TEXT])
    n = len(ids) // window
    return ids[: n * window].view(n, window)


def _hand_perplexity(model, windows) -> float:
    """exp of the mean NLL, one window and one token at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            for t in range(len(ids) - 1):
                nll -= logp[t, ids[t + 1]].item()
                count += 1
    return math.exp(nll / count)


def test_perplexity_is_exp_mean_nll_and_reproducible():
    windows = _windows()
    model = tiny_llama().eval()
    value = perplexity(model, windows, batch_size=2)
    assert value == pytest.approx(_hand_perplexity(model, windows), rel=1e-5)
    assert perplexity(model, windows, batch_size=3) == pytest.approx(value, rel=1e-6)  # independent of batching
    assert perplexity(tiny_llama(), windows) == pytest.approx(value, rel=1e-6)  # same seed, same number
    assert 1.0 < value < 2 * VOCAB  # a random model is near uniform over the vocabulary


def test_perplexity_of_windows_with_no_token_to_predict_is_refused():
    with pytest.raises(ValueError, match=r"no token to predict"):  # was a ZeroDivisionError
        perplexity(tiny_llama().eval(), _windows()[:, :1])


def test_perplexity_of_a_compiled_model_compiles_one_graph_for_a_short_last_batch():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    windows = _windows()  # 9 windows: batches of 4, 4 and 1
    model = tiny_llama().eval()
    value = perplexity(torch.compile(model, backend=counting_backend), windows, batch_size=4)
    assert len(graphs) == 1
    assert value == pytest.approx(perplexity(model, windows, batch_size=3), rel=1e-6)


def test_perplexity_restores_train_mode():
    model = tiny_llama().train()
    perplexity(model, _windows())
    assert model.training
    model.eval()
    perplexity(model, _windows())
    assert not model.training


def test_training_batches_are_seeded_and_cover_an_epoch():
    windows = torch.arange(10)[:, None].repeat(1, 4)
    a = training_batches(windows, steps=7, batch_size=3, seed=1)
    b = training_batches(windows, steps=7, batch_size=3, seed=1)
    assert len(a) == 7 and all(x.shape == (3, 4) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    first_epoch = torch.cat(a)[:10, 0]
    assert sorted(first_epoch.tolist()) == list(range(10))  # without replacement within an epoch
    assert not all(torch.equal(x, y) for x, y in zip(a, training_batches(windows, 7, 3, seed=2)))


def test_finetune_trains_only_lora_and_loss_falls():
    model = tiny_peft_llama()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = _windows()[:2]
    losses = finetune(model, [batch] * 15, lr=1e-2)
    assert len(losses) == 15 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_quantize_on_calibrates_on_every_batch_it_is_given(planned_statistics):
    batches = _windows().split(2)[:3]
    quantize_on(tiny_peft_llama(), batches, {"progress": False})
    model = tiny_peft_llama()
    quantize_on(model, batches[0], {"progress": False, "bits": 3.0})
    assert [stats[0].tokens for stats in planned_statistics] == [3 * 2 * 32, 2 * 32]
    assert lowra_compile.report(model).code_bits == pytest.approx(3.0, abs=0.05)  # its options


def _accuracy_module():
    path = Path(__file__).parents[1] / "benchmarks" / "accuracy.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # as when run as a script: it imports bench_utils beside it
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("codebook", ["nf", "uniform"])
@pytest.mark.parametrize("bits", [2.0, 3.0, 4.0])
def test_baselines_store_every_channel_at_their_width(codebook, bits):
    """The NF / round-to-nearest baselines: b code bits on every channel; effective bits add the overhead
    of the format (fp16 codebook and int32 permutation entry per row, int8 absmax per 64 weights with
    an fp32 scale per 256 absmax values), nothing else."""
    import lowra_compile

    options = _accuracy_module().fixed_width(bits, codebook)
    model = tiny_peft_llama()
    compiled = torch.compile(model, backend="lowra", options={**options, "inner": "eager", "progress": False})
    ids = _windows()[:2]
    compiled(input_ids=ids, labels=ids, use_cache=False)
    rep = lowra_compile.report(compiled)
    assert len(rep.layers) == 14  # 2 layers x 7 projections
    for row in rep.layers:
        n, k = row.shape
        assert row.code_bits == bits and row.channels_per_bits[int(bits)] == n
        overhead = (2 ** int(bits) * 16 + 32) / k + 8 / 64 + 32 / (64 * 256)
        assert bits + 8 / 64 <= row.effective_bits <= bits + overhead + 32 / k  # + at most one padding word per row


def _merge_rows(out: Path, first: int) -> None:
    accuracy = _accuracy_module()
    for i in range(first, first + 20):
        accuracy.merge_point(out, {"grid": "full"}, {"method": "m", "bits": float(i), "after": {"kjv": i}})


def test_shards_merging_into_one_json_keep_every_point(tmp_path):
    """Shards of one grid write the same JSON after every point: the lock keeps every point, and a point
    written again replaces the old one."""
    import multiprocessing

    out = tmp_path / "grid.json"
    ctx = multiprocessing.get_context("fork")
    shards = [ctx.Process(target=_merge_rows, args=(out, first)) for first in (0, 20, 40)]
    for p in shards:
        p.start()
    for p in shards:
        p.join()
    assert [p.exitcode for p in shards] == [0, 0, 0]
    _accuracy_module().merge_point(out, {"grid": "full"}, {"method": "m", "bits": 5.0, "after": {"kjv": -1}})
    points = json.loads(out.read_text())["points"]
    assert sorted(p["bits"] for p in points) == [float(i) for i in range(60)]
    assert next(p for p in points if p["bits"] == 5.0)["after"] == {"kjv": -1}


def test_points_join_only_a_json_of_the_same_settings(tmp_path):
    """A grid resumed across sessions, or a slice merged into a JSON, must not mix points run with other
    settings (such as another inner compiler) under one header: the run stops before its first point."""
    accuracy = _accuracy_module()
    out = tmp_path / "grid.json"
    settings = {"steps": 200, "inner": "eager"}
    assert accuracy.done_points(out, settings) == set()
    accuracy.merge_point(out, {"grid": "full", "settings": settings}, {"method": "nf", "bits": 4.0})
    assert accuracy.done_points(out, dict(settings)) == {("nf", 4.0)}
    with pytest.raises(SystemExit, match=r"'inner': \('eager', 'inductor'\)"):
        accuracy.done_points(out, {**settings, "inner": "inductor"})


def test_point_selection_slices_the_grid_and_runs_named_methods_at_every_named_budget():
    accuracy = _accuracy_module()
    grid = accuracy.FULL_GRID
    assert accuracy.select_points(grid, None, None) == grid
    assert accuracy.select_points(grid, None, "2.0") == [p for p in grid if p[1] in (None, 2.0)]
    assert accuracy.select_points(grid, "lowra,nf", "2.0,3.0") == [
        ("lowra", 2.0), ("lowra", 3.0), ("nf", 2.0), ("nf", 3.0)
    ]
    assert accuracy.select_points(grid, "unquantized", "2.0") == [("unquantized", None)]
    assert accuracy.select_points(grid, "lowra-no-loftq", None) == [("lowra-no-loftq", b) for b in (3.0, 2.0, 1.5)]
    # a method runs at every named budget, even one its grid (or no grid) has: the ablations' is 3, 2, 1.5
    assert accuracy.select_points(grid, "lowra-group-128,lowra-no-loftq", "3.0625,2.5") == [
        ("lowra-group-128", 3.0625), ("lowra-group-128", 2.5), ("lowra-no-loftq", 3.0625), ("lowra-no-loftq", 2.5)
    ]
    with pytest.raises(SystemExit, match="whole budgets, not 2.5"):
        accuracy.select_points(grid, "nf", "4.0,2.5")
    with pytest.raises(SystemExit, match="name its budgets"):
        accuracy.select_points(grid, "lowra-refit", None)
    with pytest.raises(SystemExit, match="unknown methods.*lowra-typo"):
        accuracy.select_points(grid, "lowra,lowra-typo", "2.0")


def test_compile_seconds_count_dynamo_and_the_graph_compiler_inside_it():
    accuracy = _accuracy_module()
    before = accuracy.compile_seconds()
    torch._dynamo.reset()
    torch.compile(lambda x: torch.sin(x) * 2, backend="aot_eager")(torch.randn(3))
    spent = {k: v - before[k] for k, v in accuracy.compile_seconds().items()}
    assert 0 < spent["aot_inductor"] <= spent["dynamo"]


def test_token_window_cache_is_read_back_and_refuses_other_settings(tmp_path):
    import argparse

    accuracy = _accuracy_module()
    path = tmp_path / "windows.pt"
    windows = {"train": torch.arange(8).view(2, 4), "kjv": torch.ones(1, 4, dtype=torch.long)}
    torch.save({"made_by": {"window": 4, "eval_windows": None, "seed": 0}, "windows": windows}, path)
    args = argparse.Namespace(windows=path, window=4, eval_windows=None, seed=0)
    assert all(torch.equal(v, windows[k]) for k, v in accuracy.load_windows(None, args).items())
    with pytest.raises(ValueError, match="holds windows for"):
        accuracy.load_windows(None, argparse.Namespace(windows=path, window=4, eval_windows=8, seed=0))


def test_random_model_rebuilds_the_saved_architecture_seeded(tmp_path):
    model = tiny_llama()
    path = tmp_path / "config.json"
    model.config.to_json_file(path)
    accuracy = _accuracy_module()
    a, b = (accuracy.random_model(path, torch.float32, seed=1) for _ in range(2))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in a.state_dict().items()} == shapes
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.lm_head.weight, model.lm_head.weight) and not a.training
