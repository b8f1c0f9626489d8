import torch
import torch.nn.functional as F

from lowra_compile.passes.linear_forms import linear_forms
from lowra_compile.passes.match import match_sites

from ..tiny_models import capture_graph


class _Transposed(torch.nn.Module):
    """Linear layers written as products with a transposed weight, and one trainable weight."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(32, 16), requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(32, 32), requires_grad=False)
        self.c = torch.nn.Parameter(torch.randn(32, 32), requires_grad=False)
        self.d = torch.nn.Parameter(torch.randn(32, 32), requires_grad=False)
        self.d_bias = torch.nn.Parameter(torch.randn(32), requires_grad=False)
        self.trained = torch.nn.Parameter(torch.randn(32, 32))

    def forward(self, x):
        h = torch.matmul(x @ self.a.T, self.b.t())
        h = torch.addmm(self.d_bias, (h @ self.c.transpose(0, 1)).flatten(0, 1), self.d.t())  # x @ W.T + b
        return h @ self.trained.T


def test_products_with_a_transposed_frozen_weight_become_linears_in_a_copy():
    x = torch.randn(2, 3, 16)
    gm, inputs = capture_graph(_Transposed(), x)
    before = [n.format_node() for n in gm.graph.nodes]
    new = linear_forms(gm)
    assert new is not gm and [n.format_node() for n in gm.graph.nodes] == before  # Dynamo's graph untouched
    # the trainable product becomes a linear too (so a LoRA branch of `x @ A.T` products is found), and no site
    assert sum(n.target is F.linear for n in new.graph.nodes) == 5
    assert [s.name for s in match_sites(new)] == ["a", "b", "c", "d"]
    torch.testing.assert_close(new(*inputs), gm(*inputs))


def test_a_graph_without_such_products_is_returned_as_it_is():
    gm, _ = capture_graph(torch.nn.Linear(8, 8).requires_grad_(False), torch.randn(2, 8))
    assert linear_forms(gm) is gm


class _InOut(torch.nn.Module):
    """GPT-2's Conv1D (flatten, addmm on an (in, out) weight, unflatten) and a product x @ W, W (in, out)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv1d = Conv1D(24, 16)  # weight (16, 24)
        self.in_out = torch.nn.Parameter(torch.randn(24, 8))
        self.requires_grad_(False)

    def forward(self, x):
        return self.conv1d(x) @ self.in_out


def test_products_with_an_in_out_weight_become_linears_of_its_transpose():
    x = torch.randn(2, 3, 16)
    gm, inputs = capture_graph(_InOut(), x)
    new = linear_forms(gm)
    linears = [n for n in new.graph.nodes if n.target is F.linear]
    assert len(linears) == 2 and all(n.args[1].target is torch.t for n in linears)
    assert not any(n.target in (torch.addmm, "view") for n in new.graph.nodes)  # Conv1D's flattening is gone
    assert linears[0].args[0].op == "placeholder"  # the 3-D input itself
    sites = match_sites(new)
    assert [(s.name, s.shape, s.transposed) for s in sites] == [("conv1d.weight", (24, 16), True), ("in_out", (8, 24), True)]
    torch.testing.assert_close(new(*inputs), gm(*inputs))
