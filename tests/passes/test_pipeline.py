import gc
import warnings
import weakref
from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput

import lowra_compile
from lowra_compile.config import LowRAConfig
from lowra_compile.passes import candidates, gptq, pipeline, release
from lowra_compile.passes.calibrate import SiteStats
from lowra_compile.passes.quantize import quantize_rows
from lowra_compile.runtime.reference import dequantize

from ..dequantized import step_matches_the_dequantized_model
from ..tiny_models import StackedExperts, batch, tiny_peft_llama


def _spy(monkeypatch):
    seen = {"choices": [], "x2": [], "errors": [], "factors": []}
    quantize_layer, plan_bits = candidates.quantize_layer, pipeline.plan_bits

    def quantize_spy(weight, choices, fit, x2, factor, **kwargs):
        seen["choices"].append(choices)
        seen["x2"].append(x2)
        seen["factors"].append(factor)
        return quantize_layer(weight, choices, fit, x2, factor, **kwargs)

    def plan_spy(errors, in_features, choices, budget):
        seen["errors"] = errors
        return plan_bits(errors, in_features, choices, budget)

    monkeypatch.setattr(candidates, "quantize_layer", quantize_spy)
    monkeypatch.setattr(pipeline, "plan_bits", plan_spy)
    return seen


def _first_step(options, data):
    model = tiny_peft_llama()
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager", **options})
    out = compiled(**data)
    if out.loss is not None:
        out.loss.backward()
    return model


def test_calibrate_off_plans_on_plain_weight_error(monkeypatch):
    seen = _spy(monkeypatch)
    _first_step({"calibrate": "off"}, batch(8))
    assert len(seen["x2"]) == 14 and all(x2 is None for x2 in seen["x2"])


def test_fisher_errors_are_activation_errors_times_gradient_moments(monkeypatch):
    seen = _spy(monkeypatch)
    _first_step({"calibrate": "activation", "loftq_iters": 0}, batch(8))
    activation = [e.clone() for e in seen["errors"]]
    assert all(x2 is not None and x2.shape[0] in (64, 128) for x2 in seen["x2"])
    seen["x2"].clear()
    torch._dynamo.reset()
    _first_step({"calibrate": "fisher", "loftq_iters": 0}, batch(8))
    ratios = [f / a.clamp_min(1e-30) for f, a in zip(seen["errors"], activation)]
    # per row, the Fisher error is the activation error times one factor E[g^2] shared by every width
    for r in ratios:
        assert torch.allclose(r, r[:, :1].expand_as(r), rtol=1e-4)
        assert (r[:, 0] > 0).all()


def _output_errors(options, data) -> float:
    """Sum over the frozen linears of ||(W - deq(W)) x||^2 on the calibration batch itself."""
    inputs, dense = {}, tiny_peft_llama()
    hooks = [
        m.base_layer.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0]))
        for name, m in dense.named_modules() if hasattr(m, "base_layer")
    ]
    dense(**data)
    for h in hooks:
        h.remove()
    model = _first_step(options, data)
    layers = dict(model.named_modules())
    total = 0.0
    for name, x in inputs.items():
        delta = dense.get_submodule(name).base_layer.weight - release.dequantized(layers[name].base_layer.weight)
        total += (x.detach() @ delta.t()).pow(2).sum().item()
    return total


def test_gptq_rounding_shares_factors_and_lowers_the_output_error(monkeypatch):
    seen = _spy(monkeypatch)
    options = {"bits": 2.0, "calibrate": "activation", "loftq_iters": 0}
    nearest = _output_errors({**options, "rounding": "nearest"}, batch(32))
    assert all(f is None for f in seen["factors"])
    seen["factors"].clear()
    torch._dynamo.reset()
    feedback = _output_errors({**options, "rounding": "gptq"}, batch(32))
    # q/k/v and gate/up read one input each: 2 layers x 4 distinct inputs for 14 linears
    assert len(seen["factors"]) == 14 and len({id(f) for f in seen["factors"]}) == 8
    assert feedback < 0.9 * nearest


def test_refitting_the_levels_lowers_the_output_error_of_the_same_plan(monkeypatch):
    options = {"bits": 2.0, "calibrate": "activation", "loftq_iters": 0, "rounding": "gptq"}
    seen = _spy(monkeypatch)
    kept = _output_errors({**options, "refit_rounds": 0}, batch(32))
    plan = [e.clone() for e in seen["errors"]]
    torch._dynamo.reset()
    refitted = _output_errors({**options, "refit_rounds": 2}, batch(32))
    assert all(torch.equal(a, b) for a, b in zip(plan, seen["errors"]))  # the plan sees the Lloyd-Max levels
    assert refitted < 0.99 * kept


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_fitted_scales_lower_the_output_error(rounding):
    # groups of 16: the tiny model's 64-input layers would otherwise be one group per row, which the row's
    # own codebook already fits
    options = {"bits": 2.0, "calibrate": "activation", "loftq_iters": 0, "rounding": rounding, "group_size": 16}
    absmax = _output_errors({**options, "scales": "absmax"}, batch(32))
    torch._dynamo.reset()
    fitted = _output_errors({**options, "scales": "fitted"}, batch(32))
    assert fitted < 0.985 * absmax


def test_gptq_holds_one_hessian_factor_at_a_time(monkeypatch):
    built, alive_before = [], []
    hessian_factor = gptq.hessian_factor

    def factor_spy(gram, damp):
        gc.collect()
        alive_before.append(sum(ref() is not None for ref in built))
        factor = hessian_factor(gram, damp)
        built.append(weakref.ref(factor))
        return factor

    monkeypatch.setattr(gptq, "hessian_factor", factor_spy)
    _first_step({"bits": 2.0, "calibrate": "activation", "loftq_iters": 0, "rounding": "gptq"}, batch(32))
    assert len(built) >= 8  # each of the 8 distinct inputs at least once (again for packing)
    assert max(alive_before) <= 1  # at most the previous one is alive when the next is built
    gc.collect()
    assert all(ref() is None for ref in built)  # and none outlives quantization


def test_fisher_without_a_loss_falls_back_to_activation_statistics(monkeypatch):
    seen = _spy(monkeypatch)
    data = batch(8)
    data.pop("labels")
    with pytest.warns(UserWarning, match="no loss gradient"):
        _first_step({"calibrate": "fisher"}, data)
    assert all(x2 is not None for x2 in seen["x2"])


def test_packing_happens_once_per_weight_and_a_recompile_reads_released_weights_without_dequantizing(monkeypatch):
    seen = _spy(monkeypatch)
    model = tiny_peft_llama()
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})
    compiled(**batch(8)).loss.backward()
    # Dynamo's fake copy of each released weight queries only metadata (is_view, storage_offset, is_conj,
    # ...), which must not dequantize the whole weight
    monkeypatch.setattr(release, "dequantized", lambda p: pytest.fail("dequantized a weight"))
    with torch.no_grad():  # grad mode and shape changes recompile; the weights are packed already
        model.eval()
        compiled(**batch(12))
    assert len(seen["x2"]) == 14
    assert lowra_compile.report(compiled).layers


def test_each_expert_of_a_mixture_takes_codebooks_weighted_by_its_own_tokens():
    # every expert's tokens are loud on channels of their own: pooled over the experts, E[x^2] would weigh
    # each expert's codebooks and group scales by the other experts' loud channels as well
    counts, starts = (6, 10, 4, 8), (0, 6, 16, 20)
    x = torch.randn(28, 64, generator=torch.Generator().manual_seed(1))
    for e, (start, count) in enumerate(zip(starts, counts)):
        x[start : start + count, 16 * e : 16 * (e + 1)] *= 10
    offsets = torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)
    model = StackedExperts(experts=4, n=12, k=64)
    dense = model.weight.detach().clone()
    options = {"bits": 2.5, "rounding": "nearest", "progress": False, "inner": "eager"}
    torch.compile(model, backend="lowra", options=options)(x, offsets, torch.randn(28, 12)).backward()

    fit = pipeline.codebook_fit(lowra_compile.LowRAConfig(**options))
    packed = release.packed_weight(model.weight)
    widths = torch.tensor([b for b, rows in packed.rows_per_width().items() for _ in range(rows)])
    bits = torch.empty_like(widths).index_put_((packed.perm.long(),), widths).view(4, 12)
    got = release.dequantized(model.weight).float()
    own_error = pooled_error = 0.0
    for e, (start, count) in enumerate(zip(starts, counts)):
        tokens = x[start : start + count]
        own = quantize_rows(dense[e], bits[e], fit, (tokens**2).mean(0))
        own = dequantize(own.tensors(), 64, 64, torch.float32)
        torch.testing.assert_close(got[e], own, msg=f"expert {e}")
        pooled = quantize_rows(dense[e], bits[e], fit, (x**2).mean(0))
        pooled = dequantize(pooled.tensors(), 64, 64, torch.float32)
        own_error += ((tokens @ (dense[e] - own).t()) ** 2).sum().item()
        pooled_error += ((tokens @ (dense[e] - pooled).t()) ** 2).sum().item()
    assert own_error < pooled_error  # on the tokens each expert runs


def test_the_calibration_hint_counts_tokens_not_the_rows_a_mixture_routes_to_its_experts():
    attention = SiteStats(torch.ones(8), None, None, 16)
    experts = SiteStats(torch.ones(4, 8), None, None, 32, torch.tensor([10, 12, 6, 4]))  # top-2: each token twice
    with pytest.warns(UserWarning, match=r"calibrating on 16 tokens \(the first batch\)"):
        pipeline._hint_more_calibration([experts, None, attention], None)
    routed = r"calibrating on 32 rows routed to the experts, a token once per expert it takes, \(2 batches\)"
    with pytest.warns(UserWarning, match=routed):
        pipeline._hint_more_calibration([experts], 2)  # experts alone: their rows are all there is to count


@pytest.mark.parametrize("options", [{}, {"calibrate": "off", "loftq_iters": 0}])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_raises_naming_its_layer_before_anything_is_packed(options, bad):
    # calibrated, the SVD of LoftQ failed with no layer named; on nearest rounding with no LoftQ the one bad
    # element took over its row's codebook and scale, packing the whole row as NaN without a word
    model = tiny_peft_llama()
    weight = model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    with torch.no_grad():
        weight[7, 3] = bad
    with pytest.raises(ValueError, match=r"weight of layer '[^']*layers\.1\.mlp\.down_proj[^']*' holds NaN or inf"):
        lowra_compile.quantize_(model, batch(), {"progress": False, **options})
    assert not any(isinstance(p, release.ReleasedWeight) for p in model.parameters())


def test_a_layer_no_calibration_row_reached_is_planned_on_the_layers_of_its_shape():
    def layer(name, rows):
        return pipeline.Layer(SimpleNamespace(name=name), torch.zeros(rows, 8))

    layers = [layer(f"experts.{e}.weight", 6) for e in range(4)] + [layer("head.weight", 4)]
    gram = torch.eye(8)
    stats = [SiteStats(torch.full((8,), 1.0), torch.full((6,), 2.0), gram, 10),
             SiteStats(torch.full((8,), 4.0), torch.full((6,), 4.0), gram, 30),
             SiteStats(torch.zeros(8), None, None, 0),  # an expert no token was routed to
             # one whose every input was zero: every error 0, and all its rows went to the smallest width
             SiteStats(torch.zeros(8), torch.zeros(6), torch.zeros(8, 8), 12),
             SiteStats(torch.ones(8), torch.ones(4), None, 5)]
    with pytest.warns(UserWarning, match=r"2 layer\(s\) ran on no calibration tokens, or only on zero inputs "
                                         r"\(e.g. 'experts.2.weight'\)"):
        filled = pipeline.planning_statistics(stats, layers, LowRAConfig(), "")
    assert filled[0] is stats[0] and filled[1] is stats[1] and filled[4] is stats[4]
    for unreached in filled[2:4]:
        torch.testing.assert_close(unreached.x2, torch.full((8,), (10 * 1.0 + 30 * 4.0) / 40))  # pooled over rows
        torch.testing.assert_close(unreached.g2, torch.full((6,), 3.0))
        assert unreached.gram is None  # no E[x x^T]: rounded to nearest
    for head in (SiteStats(torch.zeros(8), None, None, 0), SiteStats(torch.zeros(8), torch.ones(4), None, 5)):
        with pytest.raises(ValueError, match=r"layer 'head.weight' ran on no calibration tokens.*'skip': \('head.weight',\)"):
            pipeline.planning_statistics([*stats[:4], head], layers, LowRAConfig(), "")


class _ExpertPerLinear(torch.nn.Module):
    """A mixture written as one Linear per expert; tokens go to expert id % 2, so experts 2 and 3 get none."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(128, 64)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(4)).requires_grad_(False)
        self.head = torch.nn.Linear(64, 128)

    def expert(self, e, h, choice, out):
        rows = (choice == e).nonzero().squeeze(-1)  # a graph break: each expert in a graph of its own
        return out.index_add(0, rows, self.experts[e](h[rows]))

    def forward(self, input_ids, labels=None, **kwargs):
        h = self.embed(input_ids).reshape(-1, 64)
        choice = input_ids.reshape(-1) % 2
        out = torch.zeros_like(h)
        # not a loop: Dynamo runs a frame whose loop breaks the graph eagerly, and quantizes nothing
        out = self.expert(0, h, choice, out)
        out = self.expert(1, h, choice, out)
        out = self.expert(2, h, choice, out)
        out = self.expert(3, h, choice, out)
        logits = self.head(out + h).reshape(*input_ids.shape, -1)
        return CausalLMOutput(loss=torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()),
                              logits=logits)


def test_quantize_plans_experts_no_token_reached_on_the_others_and_the_model_trains_as_dequantized():
    # quantize_ failed ("ran on no calibration tokens (a batch with no rows?)") though the batch had 32 tokens
    model = _ExpertPerLinear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowra_compile.quantize_(model, batch(16), {"progress": False, "inner": "eager"})
        compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})
        step_matches_the_dequantized_model(compiled, model, batch(16, seed=1))
    said = [str(w.message) for w in caught if "lowra" in str(w.message)]
    assert any("2 layer(s) ran on no calibration tokens, or only on zero inputs (e.g. 'experts.2.weight')" in m
               for m in said), said
    # the head's graph (after the last expert's break) holds no frozen weight, but its model does
    assert not [m for m in said if "nothing in this graph is quantized" in m], said
    assert all(isinstance(expert.weight, release.ReleasedWeight) for expert in model.experts)
