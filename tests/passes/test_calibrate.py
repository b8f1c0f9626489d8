import pytest
import torch

from lowra_compile.passes.calibrate import calibrate, more_batches, more_inputs
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
    torch.testing.assert_close(stats[0].g2, (ga**2).reshape(-1, 6).mean(0))
    torch.testing.assert_close(stats[1].g2, (gb**2).reshape(-1, 4).mean(0))
    assert model.head.grad is None, "calibration must not leave gradients on parameters"


def test_graph_without_loss_gives_activation_statistics_only():
    model, x = TwoLayers(), torch.randn(3, 8)
    gm, inputs = capture_graph(model, x)
    stats = calibrate(gm, match_sites(gm), inputs)
    assert all(s.g2 is None for s in stats)
    torch.testing.assert_close(stats[0].x2, (x**2).mean(0))


def test_second_moment_matrices_are_shared_by_layers_reading_one_input_and_count_its_tokens():
    model, x = TwoLayers(), torch.randn(3, 5, 8)
    gm, inputs = capture_graph(lambda x: (model.a(x), model.a(x), model.b(torch.tanh(model.a(x)))), x)
    sites = match_sites(gm)
    stats = calibrate(gm, sites, inputs, gram=True)
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(stats[0].gram, flat.t() @ flat / 15)
    torch.testing.assert_close(stats[0].gram.diagonal(), stats[0].x2)
    readers_of_x = [s for site, s in zip(sites, stats) if site.shape[1] == 8]
    assert len(readers_of_x) == 3 and all(s.gram is readers_of_x[0].gram for s in readers_of_x)
    assert all(s.tokens == 15 for s in stats)  # 3 x 5 rows of x: what the damping of gram depends on
    assert all(s.gram is None for s in calibrate(gm, sites, inputs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_second_moment_matrices_of_a_gpu_model_wait_in_host_memory():
    model, x = TwoLayers().cuda(), torch.randn(3, 5, 8, device="cuda")
    gm, inputs = capture_graph(model, x)
    stats = calibrate(gm, match_sites(gm), inputs, gram=True)
    assert stats[0].gram.device.type == "cpu" and stats[0].x2.is_cuda
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(stats[0].gram, (flat.t() @ flat / 15).cpu())


def test_more_batches_add_up_to_statistics_over_all_their_tokens():
    model = TwoLayers()
    (x1, t1), (x2, t2) = [(torch.randn(3, 5, 8), torch.randn(3, 5, 4)) for _ in range(2)]
    gm, inputs = capture_graph(model, x1, t1)
    sites = match_sites(gm)
    second = [x2 if v is x1 else t2 if v is t1 else v for v in inputs]
    both = calibrate(gm, sites, inputs, gram=True, more_inputs=[second])
    one, two = calibrate(gm, sites, inputs, gram=True), calibrate(gm, sites, second, gram=True)

    flat = torch.cat([x1, x2]).reshape(-1, 8)
    torch.testing.assert_close(both[0].x2, (flat**2).mean(0))
    torch.testing.assert_close(both[0].gram, flat.t() @ flat / 30)
    assert [s.tokens for s in both] == [30, 30]
    for b, o, t in zip(both, one, two):
        torch.testing.assert_close(b.x2, (o.x2 + t.x2) / 2)
        # each batch's loss is a mean over its own tokens: its E[g^2] is averaged per batch
        torch.testing.assert_close(b.g2, (o.g2 + t.g2) / 2)
    assert not torch.allclose(both[0].x2, one[0].x2)


def test_further_batches_replace_the_first_batch_among_the_graph_inputs():
    model, x, target = TwoLayers(), torch.randn(3, 5, 8), torch.randn(3, 5, 4)
    gm, inputs = capture_graph(model, x, target)
    assert more_inputs(inputs) == []  # none given
    others = [{"x": torch.randn(3, 5, 8), "target": torch.randn(3, 5, 4)} for _ in range(2)]
    with more_batches({"x": x, "target": target}, others):
        runs = more_inputs(inputs)
    assert len(runs) == 2
    for run, other in zip(runs, others):
        assert len(run) == len(inputs)
        assert any(v is other["x"] for v in run) and any(v is other["target"] for v in run)
        assert not any(v is x or v is target for v in run)
        assert all(v is w for v, w in zip(run, inputs) if not any(w is t for t in (x, target)))  # parameters kept


def test_a_graph_not_fed_by_the_batch_warns_and_calibrates_on_the_first_batch_only():
    model, hidden = TwoLayers(), torch.randn(3, 8)
    gm, inputs = capture_graph(model, hidden)  # as a graph after a graph break: activations, not the batch
    with more_batches({"input_ids": torch.zeros(3, 4)}, [{"input_ids": torch.ones(3, 4)}]):
        with pytest.warns(UserWarning, match="does not take the calibration batch"):
            assert more_inputs(inputs) == []


def test_stacked_experts_get_per_expert_gradients_and_an_unreached_expert_the_others_mean():
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
    per_expert = torch.stack([(g[s:e] ** 2).sum(0) for s, e in zip([0, 3, 3, 8], [3, 3, 8, 10])]) / len(g)
    per_expert[1] = per_expert[[0, 2, 3]].mean(0)
    torch.testing.assert_close(stats.g2, per_expert.reshape(-1))
    torch.testing.assert_close(stats.x2, (x**2).mean(0))  # pooled over every expert's rows
