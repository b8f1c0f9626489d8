import pytest
import torch

from lowra_compile.passes.calibrate import ModelCalibration, calibrate
from lowra_compile.passes.match import match_sites

from ..tiny_models import StackedExperts, capture_graph


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 6).requires_grad_(False)
        self.b = torch.nn.Linear(6, 4).requires_grad_(False)
        self.head = torch.nn.Parameter(torch.randn(4))  # trainable, so a loss reaches the frozen layers

    def forward(self, x, target=None):
        y = self.b(torch.tanh(self.a(x))) * self.head
        return ((y - target) ** 2).mean() if target is not None else y


def test_first_batch_second_moments_and_loss_gradients():
    model, x, target = TwoLayers(), torch.randn(3, 5, 8), torch.randn(3, 5, 4)
    gm, inputs = capture_graph(model, x, target)
    sites = match_sites(gm)
    stats = calibrate(gm, sites, inputs)

    h_in = x.requires_grad_(False)
    ya = model.a(h_in).requires_grad_()
    yb = model.b(torch.tanh(ya))
    yb.retain_grad()
    loss = ((yb * model.head - target) ** 2).mean()
    ga, gb = torch.autograd.grad(loss, [ya, yb])
    torch.testing.assert_close(stats[0].x2, (x**2).reshape(-1, 8).mean(0))
    torch.testing.assert_close(stats[1].x2, (torch.tanh(ya) ** 2).reshape(-1, 6).mean(0))
    rows = x.numel() // 8  # each row's gradient of the loss summed over rows, not averaged
    torch.testing.assert_close(stats[0].g2, (ga**2).reshape(-1, 6).mean(0) * rows**2)
    torch.testing.assert_close(stats[1].g2, (gb**2).reshape(-1, 4).mean(0) * rows**2)
    assert model.head.grad is None, "calibration must not leave gradients on parameters"


@pytest.mark.parametrize("half", ["model", "autocast", "autocast on the first layer"])
def test_loss_gradients_of_a_float16_graph_are_taken_scaled_and_match_float32(half):
    # a mean loss over 4,096 rows gives each row's output a gradient below float16's normal range: unscaled,
    # E[g^2] lost 36-42% of q_proj's on a tiny Llama (every width planned on it). Under autocast a layer may
    # read float32 and write float16: the first one here, or the only float16 one.
    model, x, target = TwoLayers(), torch.randn(64, 64, 8), torch.randn(64, 64, 4)
    with torch.no_grad():
        model.head.mul_(1e-3)  # unscaled: the first layer's E[g^2] 27% off
    wide = calibrate(*_graph_and_sites(model, x, target))

    def under_autocast(x, target):
        with torch.autocast("cpu", dtype=torch.float16):
            return model(x, target)

    def first_under_autocast(x, target):
        with torch.autocast("cpu", dtype=torch.float16):
            h = model.a(x)
        return ((model.b(torch.tanh(h.float())) * model.head - target) ** 2).mean()

    if half == "model":
        half = calibrate(*_graph_and_sites(model.half(), x.half(), target.half()))
    else:
        run = under_autocast if half == "autocast" else first_under_autocast
        half = calibrate(*_graph_and_sites(run, x, target))
    for got, expected in zip(half, wide):
        assert got.g2.dtype == torch.float32
        torch.testing.assert_close(got.g2, expected.g2, rtol=2e-2, atol=0)


def _graph_and_sites(model, *args):
    gm, inputs = capture_graph(model, *args)
    return gm, match_sites(gm), inputs


def test_graph_without_loss_gives_activation_statistics_only():
    model, x = TwoLayers(), torch.randn(3, 8)
    gm, inputs = capture_graph(model, x)
    stats = calibrate(gm, match_sites(gm), inputs)
    assert all(s.g2 is None for s in stats)
    torch.testing.assert_close(stats[0].x2, (x**2).mean(0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_calibration_input_raises_naming_the_layer(bad):
    model, x = TwoLayers(), torch.randn(3, 8)
    x[1, 2] = bad
    gm, inputs = capture_graph(model, x)
    with pytest.raises(ValueError, match=r"calibration inputs of layer 'a.weight' are not finite"):
        calibrate(gm, match_sites(gm), inputs)


def test_a_calibration_batch_of_no_tokens_gives_zero_tokens_and_no_nan():
    # the pipeline then plans such a layer on the layers of its shape, or raises naming it (test_pipeline)
    gm, inputs = capture_graph(TwoLayers(), torch.randn(0, 8))
    stats = calibrate(gm, match_sites(gm), inputs, gram=True)
    assert all(s.tokens == 0 and s.gram is None and not s.x2.any() for s in stats)


def test_second_moment_matrices_are_shared_by_layers_reading_one_input_and_count_its_tokens():
    model, x = TwoLayers(), torch.randn(3, 5, 8)
    other = torch.nn.Linear(8, 5).requires_grad_(False)
    gm, inputs = capture_graph(lambda x: (model.a(x), other(x), model.b(torch.tanh(model.a(x)))), x)
    sites = match_sites(gm)
    stats = calibrate(gm, sites, inputs, gram=True)
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(stats[0].gram, flat.t() @ flat / 15)
    torch.testing.assert_close(stats[0].gram.diagonal(), stats[0].x2)
    readers_of_x = [s for site, s in zip(sites, stats) if site.shape[1] == 8]
    assert len(readers_of_x) == 3 and all(s.gram is readers_of_x[0].gram for s in readers_of_x)
    # 3 x 5 rows of x, once for `a` though it reads x twice: what the damping of gram depends on
    assert all(s.tokens == 15 for s in stats)
    assert all(s.gram is None for s in calibrate(gm, sites, inputs))


def test_a_layer_called_on_two_inputs_has_one_set_of_statistics_over_both():
    # the backend planned each call of a weight as a layer of its own, on that call's rows alone (the second
    # plan overwrote the first), and a call on no rows failed the whole graph
    model, x, y = TwoLayers(), torch.randn(3, 5, 8), torch.randn(2, 4, 8)
    gm, inputs = capture_graph(lambda x, y: model.b(torch.tanh(model.a(x)) + model.a(y).mean()) * model.head, x, y)
    sites = match_sites(gm)
    stats = calibrate(gm, sites, inputs, use_loss=False, gram=True)
    first, second = (s for site, s in zip(sites, stats) if site.shape[1] == 8)
    rows = torch.cat([x.reshape(-1, 8), y.reshape(-1, 8)])
    assert first is second and first.tokens == 23
    torch.testing.assert_close(first.x2, (rows**2).mean(0))
    torch.testing.assert_close(first.gram, rows.t() @ rows / 23)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_second_moment_matrices_of_a_gpu_model_wait_in_host_memory():
    model, x = TwoLayers().cuda(), torch.randn(3, 5, 8, device="cuda")
    gm, inputs = capture_graph(model, x)
    stats = calibrate(gm, match_sites(gm), inputs, gram=True)
    assert stats[0].gram.device.type == "cpu" and stats[0].x2.is_cuda
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(stats[0].gram, (flat.t() @ flat / 15).cpu())


def _model_calibration(gm, sites, runs) -> ModelCalibration:
    """Calibrate as quantize_ does, one batch per entry of `runs`: each a list of (graph inputs, keys) calls
    whose outputs' mean (the graphs end in a loss) is the batch's loss."""
    calibration = ModelCalibration(use_loss=True, gram=True)
    for calls in runs:
        with torch.enable_grad():
            outs = [calibration.run(gm, sites, keys, inputs)[0] for inputs, keys in calls]  # graphs return tuples
        calibration.end_batch(sum(outs) / len(outs))
    return calibration


def test_batches_add_up_to_statistics_over_all_their_tokens():
    # batches of 15 and 2 rows: each loss is a mean over its own rows, and yet every row counts alike, as in
    # one batch of all 17 (the 2-row batch's gradients are 7.5 times each row's share of a 15-row loss)
    model = TwoLayers()
    (x1, t1), (x2, t2) = [(torch.randn(rows, 8), torch.randn(rows, 4)) for rows in (15, 2)]
    gm, inputs = capture_graph(model, x1, t1)
    sites = match_sites(gm)
    second = [x2 if v is x1 else t2 if v is t1 else v for v in inputs]
    keys = {0: "a", 1: "b"}
    both = _model_calibration(gm, sites, [[(inputs, keys)], [(second, keys)]]).statistics({"a": "a", "b": "b"})
    whole_gm, whole_inputs = capture_graph(model, torch.cat([x1, x2]), torch.cat([t1, t2]))
    whole = calibrate(whole_gm, match_sites(whole_gm), whole_inputs, gram=True)

    flat = torch.cat([x1, x2])
    torch.testing.assert_close(both["a"].x2, (flat**2).mean(0))
    torch.testing.assert_close(both["a"].gram, flat.t() @ flat / 17)
    assert [s.tokens for s in both.values()] == [17, 17]
    for b, w in zip(both.values(), whole):
        torch.testing.assert_close(b.x2, w.x2)
        torch.testing.assert_close(b.g2, w.g2)
    assert not torch.allclose(both["a"].x2, calibrate(gm, sites, inputs)[0].x2)
    assert model.head.grad is None, "calibration must not leave gradients on parameters"


def test_one_graph_run_for_two_layers_records_each_under_its_own_key():
    # What Dynamo does after a graph break inside a repeated module: one graph, called once per layer with
    # that layer's weights. Each call's statistics must go to its own layer, loss gradients included.
    first, second = TwoLayers(), TwoLayers()
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(-0.5)
    x, target = torch.randn(3, 5, 8), torch.randn(3, 5, 4)
    gm, inputs = capture_graph(first, x, target)
    sites = match_sites(gm)
    own = dict(zip([p for p in first.parameters()], second.parameters()))
    other_inputs = [own.get(v, v) if isinstance(v, torch.nn.Parameter) else v for v in inputs]
    calls = [(inputs, {0: "a1", 1: "b1"}), (other_inputs, {0: "a2", 1: "b2"})]
    stats = _model_calibration(gm, sites, [calls]).statistics({k: k for k in ("a1", "b1", "a2", "b2")})

    # the batch's loss is the mean of the two calls' losses: each layer's gradient is half its own loss's
    for keys, run in (("a1", "b1"), inputs), (("a2", "b2"), other_inputs):
        alone = calibrate(gm, sites, run, gram=True)
        for key, s in zip(keys, alone):
            torch.testing.assert_close(stats[key].x2, s.x2)
            torch.testing.assert_close(stats[key].gram, s.gram)
            torch.testing.assert_close(stats[key].g2, s.g2 / 4)
    assert not torch.allclose(stats["b1"].x2, stats["b2"].x2)


def test_stacked_experts_get_their_own_statistics_and_an_unreached_expert_the_others():
    model = StackedExperts()
    counts = (3, 0, 5, 2)  # expert 1 gets no row
    x, target = torch.randn(sum(counts), 64), torch.randn(sum(counts), 12)
    offsets = torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)
    gm, inputs = capture_graph(model, x, offsets, target)
    [site] = match_sites(gm)
    assert site.experts == 4 and site.shape == (48, 64)
    with pytest.warns(UserWarning, match="1 of the 4 experts of 'weight' received no calibration tokens"):
        [stats] = calibrate(gm, [site], inputs)

    y = torch.ops.transformers.grouped_mm_fallback(x, model.weight.transpose(-2, -1), offs=offsets).requires_grad_()
    (g,) = torch.autograd.grad(((y * model.head - target) ** 2).mean(), [y])
    per_expert = torch.stack([(g[s:e] ** 2).sum(0) for s, e in zip([0, 3, 3, 8], [3, 3, 8, 10])]) * len(g)
    per_expert[1] = per_expert[[0, 2, 3]].mean(0)
    torch.testing.assert_close(stats.g2, per_expert.reshape(-1))
    own = torch.stack([(x[s:e] ** 2).mean(0) for s, e in zip([0, 3, 3, 8], [3, 3, 8, 10])])
    own[1] = (x**2).mean(0)  # the unreached expert: every other expert's rows, pooled
    torch.testing.assert_close(stats.x2, own)
    assert stats.expert_tokens.tolist() == list(counts) and stats.tokens == sum(counts)
