import warnings

import pytest
import torch
import torch.nn.functional as F

from lowra_compile.passes.linear_forms import linear_forms
from lowra_compile.passes.match import match_sites
from lowra_compile.passes.sources import placeholder_name

from ..tiny_models import ExpertsWithLora, batch, capture_graph, tiny_llama, tiny_peft_llama


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_finds_every_frozen_linear_and_its_lora_branch(dropout):
    model = tiny_peft_llama(dropout=dropout)
    gm, inputs = capture_graph(model, **batch(8))
    sites = match_sites(gm, skip=("lm_head",))
    assert len(sites) == 14 and all(s.lora is not None for s in sites)
    assert all(s.name.endswith("base_layer.weight") for s in sites)
    assert {s.lora.scaling for s in sites} == {2.0}
    for s in sites:
        assert inputs[s.weight_index] is model.get_parameter(s.name)
        if dropout:
            assert s.lora.x_lora.target is F.dropout and s.lora.x_lora.args[0] is s.x
        else:
            assert s.lora.x_lora is s.x


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_s_reads_of_the_weight_belong_to_its_site_with_the_adapter_whose_norm_they_take(dropout):
    model = tiny_peft_llama(use_dora=True, dropout=dropout)
    gm, inputs = capture_graph(model, **batch(8))  # one graph: peft_tracing takes Dynamo through PEFT's DoRA
    sites = match_sites(gm, skip=("lm_head",))
    assert len(sites) == 14 and all(s.lora is None and s.dora is not None for s in sites)
    for s in sites:
        layer = s.name.removesuffix("base_layer.weight")
        assert [placeholder_name(getattr(s.dora, f)) for f in ("lora_a", "lora_b", "magnitude")] == [
            f"{layer}lora_A.default.weight", f"{layer}lora_B.default.weight", f"{layer}lora_magnitude_vector.default.weight"]
        assert s.dora.scaling == 2.0 and s.adapter is s.dora
        readers = [u.target for read in s.dora.reads for u in read.users]
        assert (F.linear in readers) == bool(dropout)  # the base again, on the dropped-out input


class _CastAndSummed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64).requires_grad_(False)

    def forward(self, x):
        w = self.proj.weight.to(torch.float32)
        return F.linear(x, self.proj.weight) + torch.linalg.norm(w + 1, dim=0)  # columns, not DoRA's rows


class _LinearAndItsWeightAsAMatrix(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 48).requires_grad_(False)

    def forward(self, x):
        return self.proj(x) @ self.proj.weight  # read as W by F.linear and as W^T by the product's linear form


def test_a_weight_read_by_two_linears_stays_dense_with_one_warning():
    gm, _ = capture_graph(_LinearAndItsWeightAsAMatrix(), torch.randn(4, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert match_sites(linear_forms(gm)) == []
    told = [str(w.message) for w in caught if "stays dense" in str(w.message)]
    assert len(told) == 1 and "layer 'proj.weight' stays dense" in told[0], told


def test_a_cast_weight_read_otherwise_than_by_dora_stays_dense_with_a_warning():
    gm, _ = capture_graph(_CastAndSummed(), torch.randn(4, 64))
    with pytest.warns(UserWarning, match=r"layer 'proj.weight' stays dense: its weight is also read outside its F.linear \(to;"):
        assert match_sites(gm) == []


def test_skip_patterns_and_plain_linears():
    gm, _ = capture_graph(tiny_llama().requires_grad_(False), **batch(8))
    names = [s.name for s in match_sites(gm, skip=("lm_head", "mlp"))]
    assert names and all("mlp" not in n and "lm_head" not in n for n in names)


def test_trainable_weights_are_not_sites_and_a_model_nobody_froze_gets_a_warning():
    lin = torch.nn.Linear(16, 16)
    gm, _ = capture_graph(torch.nn.Sequential(lin), torch.randn(2, 16))
    message = r"nothing in this graph is quantized: its 1 linear layer\(s\) have trainable weights \(e.g. '0.weight'\)"
    with pytest.warns(UserWarning, match=message):
        assert match_sites(gm) == []


@pytest.mark.parametrize("part,op", [
    (lambda w: w * 0.5, "mul"),
    (lambda w: w[:8], "getitem"),  # a fused weight read in slices: each slice a linear of its own
    (lambda w: w.chunk(2)[1], "getitem"),
])
def test_a_frozen_weight_scaled_or_sliced_before_its_linear_stays_dense_with_a_warning_naming_it(part, op):
    # F.linear(x, W * 0.5): not a site, and it was left dense silently, with the warning for a model nobody
    # froze saying the graph's linears were all trainable; a slice of W was left dense without a word
    frozen, head = torch.nn.Linear(16, 16).requires_grad_(False), torch.nn.Linear(8 if op == "getitem" else 16, 4)
    gm, _ = capture_graph(lambda x: head(F.linear(x, part(frozen.weight))), torch.randn(2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert match_sites(gm) == []
    (message,) = [str(w.message) for w in caught]
    assert "1 frozen weight(s) stay dense" in message and f"read by linear of {op}(W)" in message


def test_two_frozen_low_rank_linears_added_unscaled_onto_a_frozen_one_are_three_sites_not_an_adapter():
    # an unscaled branch is taken as a hand-written LoRA only with trainable factors: frozen, it is the base
    # model's own layers (a bottleneck beside a projection), each quantized; fused as an adapter they stayed dense
    base, down, up = (torch.nn.Linear(k, n, bias=False).requires_grad_(False) for k, n in ((32, 32), (32, 4), (4, 32)))
    gm, _ = capture_graph(lambda x: base(x) + up(down(x)), torch.randn(2, 32))
    sites = match_sites(gm)
    assert len(sites) == 3 and all(s.lora is None for s in sites)


def test_scaling_as_symfloat_under_dynamic_shapes():
    model = tiny_peft_llama()
    captured = []

    def backend(gm, example_inputs, **_):
        captured.append(gm)
        return gm.forward

    torch.compile(model, backend=backend, dynamic=True)(**batch(8))
    sites = match_sites(captured[0], skip=("lm_head",))
    assert len(sites) == 14
    assert all(isinstance(s.lora.scaling, torch.fx.Node) for s in sites)  # a graph input, not a constant



class _OtherProducts(torch.nn.Module):
    """A linear layer, and frozen weights read by products that `linear_forms` does not make linears: one
    on the left of a product, one in an einsum."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(32, 32)
        self.left = torch.nn.Parameter(torch.randn(32, 32))
        self.in_out = torch.nn.Parameter(torch.randn(32, 32))
        self.requires_grad_(False)

    def forward(self, x):
        h = (self.left @ self.linear(x).transpose(-1, -2)).transpose(-1, -2)
        return torch.einsum("btk,kn->btn", h, self.in_out)


def test_weights_read_by_other_matrix_products_are_named_in_one_warning():
    gm, _ = capture_graph(_OtherProducts(), torch.randn(2, 4, 32))
    with pytest.warns(UserWarning) as caught:
        sites = match_sites(linear_forms(gm))
    assert [s.name for s in sites] == ["linear.weight"]
    [warning] = [w for w in caught if "stay dense" in str(w.message)]
    message = str(warning.message)
    assert "2 frozen weight(s)" in message and "'left'" in message and "'in_out'" in message
    assert "einsum" in message and "matmul" in message


class _MultiheadAttentionAndLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.proj = torch.nn.MultiheadAttention(32, 4, batch_first=True), torch.nn.Linear(32, 32)
        self.requires_grad_(False)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_s_projections_stay_dense_with_a_warning_naming_them_and_the_way_to_pack_them():
    # Dynamo keeps F.multi_head_attention_forward as one call: its in- and out-projections were left dense
    # without a word (and report().dense missed the in-projection, a parameter of the module's own)
    import lowra_compile

    model = _MultiheadAttentionAndLinear()
    gm, _ = capture_graph(model, torch.randn(2, 4, 32))
    with pytest.warns(UserWarning) as caught:
        sites = match_sites(linear_forms(gm))
    assert [s.name for s in sites] == ["proj.weight"]
    [warning] = [w for w in caught if "stay dense" in str(w.message)]
    message = str(warning.message)
    assert "'attn.in_proj_weight', 'attn.out_proj.weight'" in message and "scaled_dot_product_attention" in message
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= set(lowra_compile.report(model).dense)


def test_skipped_weights_read_by_other_matrix_products_do_not_warn():
    gm, _ = capture_graph(_OtherProducts(), torch.randn(2, 4, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.name for s in match_sites(linear_forms(gm), skip=("left", "in_out"))] == ["linear.weight"]


def test_a_module_passed_as_an_argument_keeps_its_parameter_names():
    # After a graph break Dynamo may hand a module over as L['args'][0]: names must not start with "[0]".
    module = torch.nn.Sequential(torch.nn.Linear(16, 16)).requires_grad_(False)
    gm, _ = capture_graph(lambda *args: args[0](args[1]), module, torch.randn(2, 16))
    assert [s.name for s in match_sites(gm)] == ["0.weight"]


@pytest.mark.parametrize("stored_in_out", [False, True])
def test_lora_on_stacked_experts_is_part_of_their_grouped_site(stored_in_out):
    model = ExpertsWithLora(stored_in_out)
    gm, inputs = capture_graph(model, torch.randn(10, 64), torch.tensor([3, 3, 8, 10], dtype=torch.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the update's baddbmm is not another product that leaves W dense
        warnings.filterwarnings("ignore", message="lowra: the stacked experts .* recompiles")  # PEFT's per-step
        [site] = match_sites(gm)
    assert inputs[site.weight_index] is model.weight and site.experts == 4 and site.shape == (48, 64)
    assert site.transposed == stored_in_out
    lora = site.experts_lora
    assert lora is not None and lora.scaling == 2.0 and lora.transposed == (not stored_in_out)
    assert lora.update.target is torch.baddbmm and len(lora.update.users) == 2  # the product's chain, the output
