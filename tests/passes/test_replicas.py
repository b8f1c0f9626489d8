"""Data-parallel replicas quantize as one: two gloo ranks on CPU, each with its own batches."""

import socket
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowra_compile.passes.calibrate import SiteStats
from lowra_compile.passes.replicas import average_statistics, share_first_rank

from ..tiny_models import batch, tiny_peft_llama


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path, world: int = 2) -> list:
    mp.spawn(_rank, args=(fn, world, _free_port(), str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]  # written by the test


def _rank(rank: int, fn, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a rank left waiting fails the test, not CI's clock
    torch.set_num_threads(1)
    try:
        torch.save(fn(rank), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _statistics_of_rank(rank: int) -> list[SiteStats | None]:
    k = rank + 1  # rank 0: 10 tokens of value 1, rank 1: 20 tokens of value 2
    stats = SiteStats(torch.full((3,), float(k)), torch.full((2,), float(k)), torch.full((3, 3), float(k)), 10 * k)
    # a mixture's 4 experts, each x2 over the tokens it took on this rank: rank 0 routed none to experts 2
    # and 3, rank 1 none to 0 and 3 (9, 5 and 7, 8: the pooled stand-ins calibrate gave those)
    routed = torch.tensor([[4, 6, 0, 0], [0, 5, 15, 0]])[rank]
    own = torch.tensor([[1.0, 2.0, 9.0, 5.0], [7.0, 3.0, 4.0, 8.0]])[rank]
    experts = SiteStats(own[:, None].expand(4, 2).clone(), None, None, 10 * k, routed)
    return average_statistics([stats, None, experts])


def _loss_gradient_on_rank_0_only(rank: int) -> list[SiteStats | None]:
    g2 = torch.ones(2) if rank == 0 else None  # rank 1's batch had no labels
    return average_statistics([SiteStats(torch.ones(3), g2, None, 10), SiteStats(torch.ones(3), g2, None, 10)])


def _shared_input_and_odd_bytes(rank: int) -> dict:
    k = rank + 1
    gram = torch.full((3, 3), float(k))
    q, v = (SiteStats(torch.full((3,), float(k)), None, gram, 10 * k) for _ in range(2))  # q and v read one input
    averaged = average_statistics([q, v])
    codes, scales = torch.full((3,), k, dtype=torch.uint8), torch.full((3,), float(k))  # scales start at byte 3
    share_first_rank([], [codes, scales])
    return {"shared": averaged[0].gram is averaged[1].gram, "gram": averaged[0].gram, "codes": codes, "scales": scales}


def _layers_some_ranks_never_reached(rank: int) -> list[SiteStats | None]:
    # one Linear per expert: `b` took tokens on rank 1 only, `c` on neither; a rank that did not reach a layer
    # brings the stand-ins of the layers of its shape (x2 = 5 + rank) and no E[x x^T]
    k = rank + 1
    a = SiteStats(torch.full((3,), float(k)), None, torch.full((3, 3), float(k)), 10)
    b = SiteStats(torch.full((3,), 9.0), None, torch.full((3, 3), 9.0), 10) if rank else \
        SiteStats(torch.full((3,), 5.0), None, None, 0)
    c = SiteStats(torch.full((3,), 5.0 + rank), None, None, 0)
    return average_statistics([a, b, c])


def _collectives_of_rank(rank: int) -> tuple:
    """The four checks below in one pair of processes (each spawn starts torch twice)."""
    return (_statistics_of_rank(rank), _loss_gradient_on_rank_0_only(rank), _shared_input_and_odd_bytes(rank),
            _layers_some_ranks_never_reached(rank))


def test_statistics_are_averaged_over_every_rank_s_tokens_and_their_broadcast_keeps_sharing(tmp_path):
    for (stats, empty, experts), partial, got, unreached in _spawn(_collectives_of_rank, tmp_path):
        assert empty is None and stats.tokens == 30
        torch.testing.assert_close(stats.x2, torch.full((3,), 50 / 30))  # token-weighted: (10 * 1 + 20 * 2) / 30
        torch.testing.assert_close(stats.gram, torch.full((3, 3), 50 / 30))
        torch.testing.assert_close(stats.g2, torch.full((2,), 1.5))  # mean of the ranks' means
        # each expert over the tokens it took: expert 0 rank 0's, 1 both (6 x 2 + 5 x 3) / 11, 2 rank 1's; expert
        # 3, reached by no rank, the token-weighted stand-ins (10 x 5 + 20 x 8) / 30
        torch.testing.assert_close(experts.x2, torch.tensor([1.0, 27 / 11, 4.0, 7.0])[:, None].expand(4, 2))
        assert experts.expert_tokens.tolist() == [4, 11, 15, 0]

        # a loss gradient only some ranks have is dropped on every rank; before, rank 0 reduced E[g^2] while
        # rank 1 went on to the next site's token count: mismatched collectives
        assert [s.g2 for s in partial] == [None, None] and [s.tokens for s in partial] == [20, 20]

        # q/k/v (and gate/up) share one E[x x^T]: one copy in memory, one Cholesky factor in the pipeline; the
        # broadcast packs every tensor into one byte buffer, where a uint8 [3] puts the next float32 at byte 3
        assert got["shared"]
        torch.testing.assert_close(got["gram"], torch.full((3, 3), 50 / 30))
        assert got["codes"].tolist() == [1, 1, 1] and got["scales"].tolist() == [1.0, 1.0, 1.0]  # rank 0's

        # a layer only rank 1 reached is rank 1's alone (rank 0 reduced no E[x x^T] for it: the ranks' collectives
        # went out of step and gloo aborted); one neither reached has the mean of their stand-ins
        a, b, c = unreached
        torch.testing.assert_close(a.gram, torch.full((3, 3), 1.5))
        assert b.tokens == 10 and b.x2.tolist() == [9.0] * 3 and b.gram.tolist() == [[9.0] * 3] * 3
        assert c.tokens == 0 and c.x2.tolist() == [5.5] * 3 and c.gram is None


def _train_under_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_peft_llama(use_dora=True)  # the base packed, adapters and magnitudes trained
    compiled = torch.compile(
        DistributedDataParallel(model), backend="lowra", options={"bits": 2.0, "progress": False, "inner": "eager"}
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        compiled(**batch(16, seed=10 * rank + step)).loss.backward()  # each rank its own batches
        opt.step()
        opt.zero_grad()
    packed = {n: [t.clone() for t in p._lowra_packed]
              for n, p in model.named_parameters() if hasattr(p, "_lowra_packed")}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"packed": packed, "adapters": adapters}


def _same_on_both_ranks(first: dict, second: dict, key: str, count: int, **tolerance) -> None:
    assert len(first[key]) == count and first[key].keys() == second[key].keys()
    for name, value in first[key].items():
        torch.testing.assert_close(value, second[key][name], msg=name, **tolerance)


def test_ddp_ranks_pack_the_same_base_and_keep_the_same_adapters(tmp_path):
    # a LoRA model's fused adapters under DDP: the test of quantizing ahead below
    first, second = _spawn(_train_under_ddp, tmp_path)
    _same_on_both_ranks(first, second, "packed", 14, rtol=0, atol=0)
    _same_on_both_ranks(first, second, "adapters", 42, rtol=0, atol=0)  # A, B and the magnitudes


def _quantize_ahead_under_ddp(rank: int) -> dict:
    import lowra_compile
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_peft_llama()
    ddp = DistributedDataParallel(model)
    lowra_compile.quantize_(ddp, [batch(16, seed=10 * rank + s) for s in range(2)], {"bits": 2.0, "progress": False})
    compiled = torch.compile(ddp, backend="lowra", options={"progress": False, "inner": "eager"})
    compiled(**batch(16, seed=10 * rank + 5)).loss.backward()  # DDP's reducer still works: gradients all-reduced
    packed = {n: list(p._lowra_packed) for n, p in model.named_parameters() if hasattr(p, "_lowra_packed")}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"packed": packed, "grads": grads, "dequantized_by_ddp": _dequantized_when_ddp_wraps_a_packed_model(rank)}


def _dequantized_when_ddp_wraps_a_packed_model(rank: int) -> dict:
    """How many weights DDP dequantizes as it wraps a model packed by quantize_, and one loaded packed."""
    import lowra_compile
    from lowra_compile.passes import release
    from torch.nn.parallel import DistributedDataParallel

    quantized, loaded = tiny_peft_llama(layers=1), tiny_peft_llama(layers=1)
    lowra_compile.quantize_(quantized, batch(16, seed=rank), {"bits": 2.0, "progress": False})
    with tempfile.TemporaryDirectory() as tmp:
        lowra_compile.save_quantized(quantized, f"{tmp}/base.lowra.safetensors")
        lowra_compile.load_quantized(loaded, f"{tmp}/base.lowra.safetensors")
    counted, dequantized = {}, release.dequantized
    for name, model in (("quantize_", quantized), ("load_quantized", loaded)):
        calls = []
        release.dequantized = lambda p, calls=calls: calls.append(p) or dequantized(p)
        try:
            DistributedDataParallel(model)  # broadcasts rank 0's parameters: it read each one dense
        finally:
            release.dequantized = dequantized
        counted[name] = len(calls)
    lowra_compile.materialize(quantized)
    counted["listed after materialize"] = len(getattr(quantized, "_ddp_params_and_buffers_to_ignore", ()))
    return counted


def test_ddp_ranks_quantizing_ahead_on_their_own_batches_pack_the_same_base(tmp_path):
    first, second = _spawn(_quantize_ahead_under_ddp, tmp_path)
    _same_on_both_ranks(first, second, "packed", 14, rtol=0, atol=0)
    _same_on_both_ranks(first, second, "grads", 28)
    # a packed model wrapped by DDP: its frozen packed weights are left out of DDP's first broadcast
    for rank in (first, second):
        assert rank["dequantized_by_ddp"] == {"quantize_": 0, "load_quantized": 0, "listed after materialize": 0}


def test_a_copy_of_a_packed_model_holds_its_weights_dense_and_lists_none_of_them_for_ddp_to_ignore():
    # a copy (pickle, deepcopy) holds the base dense: listed still, unfrozen bases trained on each rank
    # apart, their gradients never averaged
    import copy
    import io

    import lowra_compile

    model = tiny_peft_llama(layers=1)
    model._ddp_params_and_buffers_to_ignore = ["mine"]  # the user's own entry stays
    lowra_compile.quantize_(model, batch(16), {"bits": 2.0, "progress": False})
    assert len(model._ddp_params_and_buffers_to_ignore) == 8  # 7 packed weights and "mine"
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    for twin in (copy.deepcopy(model), torch.load(saved, weights_only=False)):
        assert not any(type(p).__name__ == "ReleasedWeight" for p in twin.parameters())
        assert twin._ddp_params_and_buffers_to_ignore == ["mine"]
    assert len(model._ddp_params_and_buffers_to_ignore) == 8
    lowra_compile.materialize(torch.compile(model))  # through a wrapper too: the list is the inner model's
    assert model._ddp_params_and_buffers_to_ignore == ["mine"]
