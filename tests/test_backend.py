"""End to end: `torch.compile(model, backend="lowra")` on tiny PEFT Llamas and plain linear stacks."""

import collections
import contextlib
import copy
import gc
import itertools
import math
import re
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers.modeling_outputs import CausalLMOutput

import lowra_compile
from lowra_compile.passes.release import ReleasedWeight, packed_weight

from .dequantized import assert_trains_as_dequantized, matches_the_reference, step_matches_the_dequantized_model
from .tiny_models import ExpertsWithLora, batch, tiny_llama, tiny_peft_llama

QUIET = {"progress": False, "inner": "eager"}


def _compile(model, **options):
    return torch.compile(model, backend="lowra", options={**QUIET, **options})


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_lora_grads_close(model, reference, fraction: float = 3e-2):
    """Each adapter's gradient is within `fraction` of the reference gradient's largest entry (bf16 products)."""
    want = _lora_grads(reference)
    for name, grad in _lora_grads(model).items():
        assert (grad - want[name]).abs().max() <= fraction * want[name].abs().max(), name


def _rewritten_graphs(monkeypatch) -> list:
    """The graphs the backend's rewrite pass returns from now on (a spy on `backend.rewrite`)."""
    graphs, rewrite = [], lowra_compile.backend.rewrite

    def spy(*args, **kwargs):
        gm, extra = rewrite(*args, **kwargs)
        graphs.append(gm)
        return gm, extra

    monkeypatch.setattr(lowra_compile.backend, "rewrite", spy)
    return graphs


def _train(compiled, model, steps: int) -> list[float]:
    """The user's unchanged loop: AdamW over the trainable parameters, loss.backward(), step."""
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    data = batch(16)
    losses = []
    for _ in range(steps):
        loss = compiled(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_a_model_loaded_with_from_pretrained_trains_as_the_dequantized_model(tmp_path):
    # on the CPU transformers memory-maps the checkpoint's weights: storages that cannot be resized
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])).train()
    assert_trains_as_dequantized(model, batch(16))
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14


@pytest.mark.parametrize("adapter,quantized", [("lora", "before freezing"), ("lora", "after"), ("dora", "before freezing"), ("dora", "after")])
def test_a_frozen_adapter_for_inference_is_served_from_the_packed_base_and_never_packed(adapter, quantized):
    # PEFT's from_pretrained(base, adapter) freezes the adapter: its factors are frozen linears too
    model = tiny_peft_llama(use_dora=adapter == "dora")
    if quantized == "before freezing":
        lowra_compile.quantize_(model, batch(16), QUIET)  # LoftQ: B is not zero
    model.requires_grad_(False).eval()
    compiled = _compile(model)
    with torch.no_grad():
        compiled(**batch(16))
        lowra_compile.codegen.clear_log()
        torch.testing.assert_close(compiled(**batch(16, seed=1)).logits, model(**batch(16, seed=1)).logits)
    calls = collections.Counter()
    for e in lowra_compile.codegen.kernel_log():
        calls[e["op"], e["rank"]] += e["calls"]
    # LoRA: the adapter fused into each packed op; DoRA: each norm from the packed weight
    assert calls["lora_linear" if adapter == "lora" else "dora_row_norms", 4] == 14
    rep = lowra_compile.report(model)
    assert len(rep.layers) == 14 and not [r for r in rep.layers if "lora" in r.name]
    assert rep.dense == ("base_model.model.lm_head.weight",)


def test_unchanged_training_loop_losses_fall():
    model = tiny_peft_llama()
    compiled = _compile(model, bits=2.0)
    losses = _train(compiled, model, steps=20)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.2, losses


@pytest.mark.parametrize(
    "inner,dynamic", [("eager", None), ("aot_eager", None), ("inductor", None), ("eager", True)]
)
def test_lora_gradients_match_eager_model_on_dequantized_weights(inner, dynamic):
    model = tiny_peft_llama()
    compiled = torch.compile(model, backend="lowra", dynamic=dynamic, options={**QUIET, "inner": inner})
    data = batch(16)
    compiled(**data).loss.backward()  # first call: calibrate, quantize, LoftQ init, release
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)  # released weights deep-copy as dense dequantized Parameters
    assert not any(isinstance(p, ReleasedWeight) for p in reference.parameters())

    counters.clear()
    loss = compiled(**data).loss
    loss.backward()
    ref_loss = reference(**data).loss
    ref_loss.backward()
    assert not counters["graph_break"]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    got, want = _lora_grads(model), _lora_grads(reference)
    assert got.keys() == want.keys() and len(got) == 28
    for name in got:
        assert (got[name] - want[name]).abs().max() <= 1e-5, name
        assert got[name].abs().sum() > 0, name


def test_four_sequence_lengths_recompile_at_most_once_and_fuse_lora(monkeypatch):
    graphs = _rewritten_graphs(monkeypatch)
    model = tiny_peft_llama()
    compiled = _compile(model)
    counters.clear()
    for length in (16, 12, 20, 10):
        compiled(**batch(length)).loss.backward()
    assert not counters["graph_break"]
    assert len(graphs) <= 2
    for gm in graphs:  # the recompiled graph reads packed weights and still fuses every adapter
        ops = [n for n in gm.graph.nodes if n.target is torch.ops.lowra.lora_linear.default]
        assert len(ops) == 14 and all(n.args[5] is not None for n in ops)
        assert not [n for n in gm.graph.nodes if n.target is F.linear and "lora" not in str(n.args[1])][:-1]


def test_frozen_weights_released_eager_calls_and_checkpoints_keep_working(tmp_path):
    model = tiny_peft_llama()
    storages = {id(p): p.untyped_storage()._cdata for p in model.parameters()}
    compiled = _compile(model)
    data = batch(16)
    compiled(**data).loss.backward()
    frozen = [p for p in model.parameters() if packed_weight(p) is not None]
    assert len(frozen) == 14  # 7 projections x 2 layers; lm_head is skipped by default
    assert all(isinstance(p, ReleasedWeight) and p.untyped_storage().nbytes() == 0 for p in frozen)
    # freed in place: nothing of lowra's (nor of Dynamo's) held a view of a weight that kept its memory alive
    assert all(p.untyped_storage()._cdata == storages[id(p)] for p in frozen)
    rep = lowra_compile.report(compiled)
    held = sum(p.untyped_storage().nbytes() + packed_weight(p).nbytes() for p in frozen)
    rows = [(row.shape[1], bits, count) for row in rep.layers for bits, count in row.channels_per_bits.items()]
    code_bits = sum(count * bits * k for k, bits, count in rows)
    # a row of b bits: its 2^b fp16 levels, a permutation entry, at most a padding word, an int8 absmax per 64
    # weights with an fp32 scale per 256 of them
    format_bits = sum(count * (2**bits * 16 + 32 + 32 + k * (8 / 64 + 32 / (64 * 256))) for k, bits, count in rows)
    assert code_bits / 8 < held <= (code_bits + format_bits) / 8
    assert abs(rep.code_bits - 2.0) <= 0.01

    with torch.no_grad():
        out = compiled(**data).logits
        torch.testing.assert_close(model(**data).logits, out)  # the uncompiled model, eagerly
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = tiny_peft_llama(seed=1)
    fresh.load_state_dict(torch.load(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data).logits, out, atol=1e-5, rtol=1e-5)


def test_materialize_restores_dense_weights():
    model = tiny_peft_llama()
    compiled = _compile(model)
    data = batch(8)
    with torch.no_grad():
        out = compiled(**data).logits
    lowra_compile.materialize(model)
    assert not any(isinstance(p, ReleasedWeight) for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, out)


def test_plain_sequential_without_adapters_under_no_grad():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(100, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).requires_grad_(False)
    x = torch.randn(8, 100)
    compiled = _compile(seq, bits=3.0)
    with torch.no_grad():
        y = compiled(x)
    assert isinstance(seq[0].weight, ReleasedWeight) and isinstance(seq[2].weight, ReleasedWeight)
    w0, w2 = (lowra_compile.passes.release.dequantized(seq[i].weight) for i in (0, 2))
    torch.testing.assert_close(y, F.linear(F.relu(F.linear(x, w0, seq[0].bias)), w2, seq[2].bias))
    assert abs(lowra_compile.report(compiled).code_bits - 3.0) <= 0.01


@pytest.mark.parametrize(
    "options,message",
    [
        ({"bits": 5.0}, "outside"),
        ({"bits": 0.5}, "outside"),
        ({"bits": 1.5, "bit_choices": (2, 4)}, "below the smallest allowed width 2; add smaller widths"),
        ({"bits": 1.5, "bit_choices": (1, 2, 4), "min_bits": 2}, "below the smallest allowed width 2; lower min_bits=2"),
        ({"bit_choices": (2.5, 4)}, "whole numbers"),
        ({"bitz": 2.0}, "unknown option"),
        ({"bit_choices": (1, 5)}, "subset"),
        ({"codebook": "k-means"}, "codebook"),
        ({"rounding": "stochastic"}, "rounding"),
        ({"scales": "minmax"}, "scales"),
        ({"rounding": "gptq", "calibrate": "off"}, "needs the input statistics"),
        ({"refit_rounds": -1}, "refit_rounds must be >= 0"),
        ({"loftq_iters": -1}, "loftq_iters, lloyd_iters and refit_rounds must be >= 0"),
        ({"group_size": 60}, "group_size=60 must be a positive multiple of 8"),
        ({"group_size": 0}, "group_size=0 must be a positive multiple of 8"),
        ({"bit_choices": (3, 4), "max_bits": 2}, "no bit width in bit_choices=.* widen the range"),
        ({"kernels": "cuda"}, "kernels='cuda' is not one of"),
        ({"inner": "cudagraphs"}, "inner='cudagraphs' is not one of"),
        ({"mode": "fast"}, "mode='fast' is not one of"),
        ({"bits": 4.0, "max_bits": 3}, "above the largest allowed width 3; raise max_bits=3"),
        ({"bits": 3.5, "bit_choices": (1, 2)}, "above the largest allowed width 2; add larger widths"),
        ({"refit_rounds": 1, "rounding": "nearest"}, 'refit_rounds=1 .* needs rounding="gptq"'),
        ({"bits": "2"}, "bits='2' must be a number"),
        ({"bit_choices": "124"}, "bit_choices='124' must be a tuple of widths"),
        ({"group_size": 64.0}, "group_size=64.0 must be a whole number"),
        ({"lloyd_iters": "12"}, "lloyd_iters='12' must be a whole number"),
        ({"skip": None}, "skip=None must be a tuple of layer names"),
        ({"skip": ""}, "holds an empty name, which is part of every layer's name"),
        ({"skip": ("lm_head", "")}, "holds an empty name"),
        ({"progress": "no"}, "progress='no' must be True or False"),
        ({"candidates_dir": 5}, "candidates_dir=5 must be a folder's path"),
        ({"candidates_dir": ""}, "candidates_dir='' must be a folder's path"),  # it filled the working folder
        ({"candidates_dir": __file__}, "candidates_dir=.* must be a folder's path"),  # it failed after calibrating
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        lowra_compile.LowRAConfig.from_options(options)


def test_the_backend_raises_a_bad_option_on_the_first_call():
    options = {"bits": 1.5, "bit_choices": (2, 4)}
    compiled = torch.compile(torch.nn.Sequential(torch.nn.Linear(64, 64)).requires_grad_(False), backend="lowra", options=options)
    with pytest.raises(Exception, match="below the smallest allowed width 2"):
        compiled(torch.randn(2, 64))


def test_a_compile_asking_other_kernels_says_the_choice_is_process_wide(monkeypatch):
    monkeypatch.setattr(lowra_compile.backend, "_kernels_asked", None)
    monkeypatch.setattr(lowra_compile.codegen.select, "_mode", "auto")
    x = torch.randn(2, 64)
    for kernels in ("reference", "reference"):  # the same again: nothing to say
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*process-wide")
            _compile(torch.nn.Linear(64, 64).requires_grad_(False), kernels=kernels, calibrate="off")(x)
    with pytest.warns(UserWarning, match="kernels='triton' now applies to every model .* kernels='reference' before"):
        _compile(torch.nn.Linear(64, 64).requires_grad_(False), kernels="triton", calibrate="off")(x)
    assert lowra_compile.codegen.kernel_mode() == "triton"


def test_options_are_normalised_and_the_quantizing_ones_listed():
    config = lowra_compile.LowRAConfig(bit_choices=[4, 2, 2.0, 1], calibrate=True, skip=["lm_head"])
    assert config.bit_choices == (1, 2, 4) and config.calibrate == "fisher" and config.skip == ("lm_head",)
    one = lowra_compile.LowRAConfig(bit_choices=2, skip="lm_head")  # one width, one name (not its letters)
    assert one.bit_choices == (2,) and one.skip == ("lm_head",)
    generated = lowra_compile.LowRAConfig(bit_choices=(b for b in (2, 4)), skip=(n for n in ["lm_head"]))
    assert generated.bit_choices == (2, 4) and generated.skip == ("lm_head",)
    with pytest.raises(ValueError, match="options must be a dict"):
        lowra_compile.LowRAConfig.from_options(2.0)
    assert lowra_compile.LowRAConfig(min_bits=2, max_bits=3).allowed_bits == (2, 3)
    quantizing = config.quantizing()
    assert quantizing["bit_choices"] == [1, 2, 4] and quantizing["rounding"] == "gptq"
    assert set(quantizing) == set(lowra_compile.config.QUANTIZING) and "kernels" not in quantizing


def test_default_rounding_is_gptq_when_calibrating_and_nearest_without():
    config = lowra_compile.LowRAConfig
    assert config().rounding == "gptq" and config(calibrate="activation").rounding == "gptq"
    assert config(calibrate="off").rounding == "nearest" and config(calibrate=False).rounding == "nearest"
    assert config(rounding="nearest").rounding == "nearest"


def test_complex_weights_raise_naming_the_layer():
    lin = torch.nn.Linear(64, 64, dtype=torch.complex64).requires_grad_(False)
    compiled = _compile(torch.nn.Sequential(lin))
    with pytest.raises(Exception, match=r"complex64.*skip"):
        compiled(torch.randn(2, 64, dtype=torch.complex64))


def _compiled_matches_eager(model, compiled, data):
    with torch.no_grad():
        torch.testing.assert_close(compiled(**data).logits, model(**data).logits, atol=1e-5, rtol=1e-5)


def _break_the_graph_in_every_mlp(model):
    """One graph per decoder layer's attention, and one per MLP, that Dynamo runs for every layer."""
    for layer in model.base_model.model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())


def test_a_graph_break_in_every_layer_of_more_layers_than_the_recompile_limit_packs_and_fuses_them_all():
    # After a graph break inside a layer, Dynamo compiles that layer's frame once per layer on the first
    # call (its weights are still dense when its turn comes); past its limit the other layers kept their
    # dense weights, and ran unfused, for good. Later calls run the last layer's graph for every layer (the
    # guards hold for all): each call must still read its own layer's packed weights.
    model = tiny_peft_llama(layers=6)
    _break_the_graph_in_every_mlp(model)
    compiled = _compile(model, bits=2.0)
    with torch._dynamo.config.patch(recompile_limit=5):  # transformers' own frames take 4 of them
        compiled(**batch(16)).loss.backward()
        base = {n: p for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
        assert len(base) == 42 and all(isinstance(p, ReleasedWeight) for p in base.values())
        lowra_compile.codegen.clear_log()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*run the graph eagerly, unfused")
            step_matches_the_dequantized_model(compiled, model, batch(16, seed=1))
    fused = [e for e in lowra_compile.codegen.kernel_log() if e["op"] == "lora_linear" and e["rank"] == 4]
    assert sum(e["calls"] for e in fused) == 42  # every LoRA layer of every layer, through the fused op


def test_a_layer_without_a_graph_of_its_own_runs_unfused_with_its_own_weights_and_a_warning():
    model = tiny_peft_llama()
    _break_the_graph_in_every_mlp(model)
    compiled = _compile(model, bits=2.0)
    # the loss is in another graph than the layers: the backend plans without its gradient and says so
    with pytest.warns(UserWarning, match=r"no loss gradient reached .* lowra_compile.quantize_\(model, batches\)"):
        compiled(**batch(16)).loss.backward()
    for p in model.base_model.model.model.layers[0].parameters():
        p.__dict__.pop("_lowra_graphs", None)  # as if its graphs were compiled for other weights
    with pytest.warns(UserWarning, match="graph break inside a repeated module"):
        step_matches_the_dequantized_model(compiled, model, batch(16, seed=1))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_dora_layers_are_packed_in_one_graph_and_train_as_the_dequantized_model(inner, monkeypatch):
    # PEFT's DoRA breaks the graph in every layer under plain Dynamo (`peft_tracing`); through lowra its base
    # linears reach one graph, are packed and their norms read the packed weights, never dense
    graphs, rewrite = [], lowra_compile.backend.rewrite
    monkeypatch.setattr(lowra_compile.backend, "rewrite", lambda *a, **kw: graphs.append(rewrite(*a, **kw)) or graphs[-1])
    model = tiny_peft_llama(use_dora=True)
    assert torch._dynamo.explain(model)(**batch(8)).graph_break_count == 0
    torch._dynamo.reset()
    compiled = _compile(model, inner=inner)
    compiled(**batch(8)).loss.backward()
    (gm, _), = graphs
    targets = collections.Counter(n.target for n in gm.graph.nodes)
    assert targets[torch.ops.lowra.dora_row_norms.default] == 14  # PEFT's identity, B A and norm are gone:
    assert not targets[torch.eye] and not targets[torch.linalg.norm] and not targets[torch.ops.lowra.dequant.default]
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14
    assert lowra_compile.report(model).dense == ("base_model.model.lm_head.weight",)
    lowra_compile.codegen.clear_log()
    compiled(**batch(8)).loss.backward()
    calls = collections.Counter()
    for entry in lowra_compile.codegen.kernel_log():
        calls[entry["op"]] += entry["calls"]
    assert calls["dora_row_norms"] == 14 and "dequant" not in calls  # one norm per layer, no dense W
    step_matches_the_dequantized_model(compiled, model, batch(8, seed=1))
    magnitudes = [p for n, p in model.named_parameters() if "magnitude" in n]
    assert len(magnitudes) == 14 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_on_a_base_quantized_ahead_takes_its_norms_from_the_packed_weight(dtype):
    # a model quantized ahead or loaded (load_quantized) reaches the backend with its weights packed: DoRA's
    # reads of W are dequantizations there, and the norm was one dense W per layer and call; with dropout
    # each weight has two packed ops (the base output of the dropped-out input too) and one norm. A bf16
    # base has float32 adapters, and DoRA's cast of W to them failed to compile (a move of the packed weight)
    model = tiny_peft_llama(use_dora=True, dropout=0.1, dtype=dtype)
    lowra_compile.quantize_(model, batch(16), QUIET)
    compiled = _compile(model)
    compiled(**batch(8)).loss.backward()
    lowra_compile.codegen.clear_log()
    compiled(**batch(8)).loss.backward()
    calls = collections.Counter()
    for entry in lowra_compile.codegen.kernel_log():
        calls[entry["op"]] += entry["calls"]
    assert calls["dora_row_norms"] == 14 and calls["lora_linear"] == 28 and "dequant" not in calls
    if dtype == torch.float32:
        step_matches_the_dequantized_model(compiled, model, batch(8, seed=1))
        return
    model.zero_grad(set_to_none=True)
    reference, losses = copy.deepcopy(model), []
    for run in (compiled, reference):
        torch.manual_seed(1)
        losses.append(run(**batch(8, seed=1)).loss)
        losses[-1].backward()
    torch.testing.assert_close(*losses, atol=0, rtol=2e-4)  # W dequantized in float32, PEFT's upcast from bf16
    _assert_lora_grads_close(model, reference)


def test_dora_magnitudes_start_at_the_norms_of_the_quantized_layers_with_their_loftq_adapters():
    model = tiny_peft_llama(use_dora=True)
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    lowra_compile.quantize_(model, batch(16), {**QUIET, "bits": 2.0})
    reference = copy.deepcopy(model)
    lowra_compile.materialize(reference)
    for name, module in reference.named_modules():
        if hasattr(module, "lora_magnitude_vector"):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            assert b.abs().sum() > 0  # LoftQ started the adapter
            norms = torch.linalg.norm(module.base_layer.weight + 2.0 * b @ a, dim=1)
            magnitude = module.lora_magnitude_vector["default"].weight
            torch.testing.assert_close(magnitude, norms)  # DoRA's scale starts at 1: the quantized layer
            assert not torch.allclose(magnitude, dense[f"{name}.lora_magnitude_vector.default.weight"], rtol=1e-3)


@pytest.mark.parametrize("bf16", ["model", "base", "autocast"])
def test_dora_in_bfloat16_matches_the_dequantized_model(bf16):
    # PEFT's DoRA casts W to the input's dtype: a bf16 model's norm reads a bf16 dequantization; a bf16 base
    # wrapped by PEFT (from_pretrained in bf16, then get_peft_model) has float32 adapters, which DoRA's input
    # and W are cast to (every layer stayed dense); under autocast (a float32 model, Trainer(bf16=True)) the
    # norm stays float32 while the packed linears compute in bf16
    model = tiny_peft_llama(use_dora=True, dropout=0.1, dtype=torch.bfloat16 if bf16 == "base" else torch.float32)
    if bf16 == "model":
        model = model.to(torch.bfloat16)
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 == "autocast")
    compiled, data = _compile(model), batch(16)
    with precision:  # quantizes; DoRA's cast reads of W belong to the site: no "stay dense" warning of them
        assert not _warnings_saying("stay dense", lambda: compiled(**data).loss.backward())
    assert lowra_compile.report(model).dense == ("base_model.model.lm_head.weight",)
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    losses = []
    for run in (compiled, reference):
        torch.manual_seed(1)  # the same dropout masks
        with precision:
            out = run(**data)
        out.loss.backward()
        assert out.logits.dtype == torch.bfloat16
        losses.append(out.loss)
    # the norm is summed in fp32 from the packed weight, where PEFT's bf16 model adds W and B A in bf16; for a
    # bf16 base the float32 reads of W dequantize in float32, where PEFT's upcast W was rounded to bf16
    torch.testing.assert_close(*losses, atol=0, rtol=0 if bf16 == "autocast" else 2e-4)
    _assert_lora_grads_close(model, reference)


def _checkpointed_dora():
    model = tiny_peft_llama(use_dora=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    return model


def test_dora_under_checkpointing_is_packed_and_trains_as_the_dequantized_model():
    # PEFT's DoRA clears an (empty) cache on every training call; lowra's `_cache_clear` writes nothing then
    # (`peft_tracing`), so Dynamo keeps the checkpointed layers in its graphs
    model = _checkpointed_dora()
    assert_trains_as_dequantized(model, batch(8))
    report = lowra_compile.report(model)
    assert report.dense == ("base_model.model.lm_head.weight",) and report.dense_note == ""


def test_dora_under_checkpointing_with_peft_s_own_cache_clear_stays_dense_and_the_report_names_the_fix(monkeypatch):
    from peft.tuners.lora.dora import DoraLinearLayer

    # as with a PEFT whose DoRA `peft_tracing` does not know: the write is refused inside the checkpoint
    monkeypatch.setattr(DoraLinearLayer, "_cache_clear", DoraLinearLayer._cache_clear.__wrapped__)
    model = _checkpointed_dora()
    _compile(model)(**batch(8)).loss.backward()
    report = lowra_compile.report(model)
    assert len(report.dense) == 15 and "skip_fwd_side_effects_in_bwd_under_checkpoint = True" in str(report)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        model = _checkpointed_dora()
        assert_trains_as_dequantized(model, batch(8))
    report = lowra_compile.report(model)
    assert report.dense == ("base_model.model.lm_head.weight",) and report.dense_note == ""


class _ReadsWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64).requires_grad_(False)

    def forward(self, x):
        return F.linear(x, self.proj.weight) + self.proj.weight.sum(0)


def test_weight_read_outside_linear_stays_dense_with_a_warning():
    module = _ReadsWeight()
    x = torch.randn(4, 64)
    expected = module(x)
    compiled = _compile(module)
    with pytest.warns(UserWarning, match="proj.weight.*stays dense"):
        got = compiled(x)
    torch.testing.assert_close(got, expected)
    assert not isinstance(module.proj.weight, ReleasedWeight)


def test_tied_lm_head_is_skipped_by_module_name():
    # Its weight is the embedding's ("embed_tokens.weight"): the default skip finds it by its module.
    model = tiny_llama(tie=True).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lowra: layer")  # no "stays dense" warning
        _compile(model)(**batch(8))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not isinstance(model.lm_head.weight, ReleasedWeight)


def test_tied_lm_head_stays_dense_and_tied():
    model = tiny_llama(tie=True).requires_grad_(False)
    compiled = _compile(model, skip=())
    with pytest.warns(UserWarning, match=r"layer 'lm_head' \(its weight: 'model.embed_tokens.weight'\) .*tied to an embedding"):
        compiled(**batch(8))  # the first call quantizes (no adapters: activation-weighted plan)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not isinstance(model.lm_head.weight, ReleasedWeight)
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, ReleasedWeight)





@pytest.mark.parametrize("path", ["compile", "quantize_"])
def test_a_weight_two_modules_share_with_an_adapter_on_the_second_gets_its_loftq_start(path):
    # the layer was the weight's first call, the one with no adapter, so LoftQ never started the adapter
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    mlp = base.model.layers[0].mlp
    mlp.gate_proj.weight = mlp.up_proj.weight  # gate_proj runs first in Llama's MLP
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["layers.0.mlp.up_proj"])).train()
    if path == "quantize_":  # called by two modules, listed under two names: not a weight no graph called
        assert not _warnings_saying("no compiled graph", lambda: lowra_compile.quantize_(model, batch(16), QUIET))
    else:
        _compile(model)(**batch(16)).loss.backward()
    up = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(up.base_layer.weight, ReleasedWeight) and up.lora_B["default"].weight.any()

class _TwoWays(torch.nn.Module):
    """Which of two frozen linears runs depends on the data: a graph break, and a frame resumed after it."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(128, 64)
        self.branches = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 64), "b": torch.nn.Linear(64, 64)})
        self.head = torch.nn.Linear(64, 128)

    def forward(self, input_ids, labels=None, **kwargs):
        h = self.branches["a" if int(input_ids[0, 0]) < 64 else "b"](self.embed(input_ids))
        logits = self.head(F.gelu(h))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits)


@pytest.mark.parametrize("first", ["compile", "quantize_"])
def test_a_frame_holding_a_packed_layer_and_one_not_yet_quantized_quantizes_it(first):
    # Branch "a" runs first: it and the head are quantized. Branch "b" then runs in a frame resumed after the
    # graph break, whose graph takes the packed head's row counts as sizes with no value (unbacked): the
    # calibration run of branch "b" failed there ("'>=' not supported between 'NoneType' and 'int'")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_TwoWays(), LoraConfig(r=4, lora_alpha=8, target_modules=["branches.a", "branches.b"]))
    model.train()
    data = {name: [batch(16, seed=seed) for seed in (0, 1)] for name in "ab"}
    for name, first_token in (("a", 3), ("b", 100)):
        for d in data[name]:
            d["input_ids"][0, 0] = d["labels"][0, 0] = first_token
    if first == "quantize_":
        lowra_compile.quantize_(model, data["a"][0], QUIET)
    compiled = _compile(model)
    compiled(**data["a"][0]).loss.backward()
    compiled(**data["b"][0]).loss.backward()  # quantizes branch "b"
    assert all(isinstance(m.base_layer.weight, ReleasedWeight) for m in model.base_model.model.branches.values())
    step_matches_the_dequantized_model(compiled, model, data["b"][1])

@pytest.mark.parametrize("first", ["compile", "quantize_"])
def test_a_head_on_the_embedding_s_storage_is_packed_in_every_call_and_the_embedding_keeps_its_rows(first):
    # lm_head.weight = Parameter(embed_tokens.weight.data): tied by storage, not by Parameter. Seen as sharing
    # storage, the head was packed but never released: compiled calls ran it quantized, eager calls and
    # copies dense. Now it is released off the shared storage, and the embedding keeps its own rows
    model = tiny_llama().requires_grad_(False)
    embed = model.model.embed_tokens.weight
    model.lm_head.weight = torch.nn.Parameter(embed.data, requires_grad=False)
    rows = embed.detach().clone()
    if first == "quantize_":
        lowra_compile.quantize_(model, batch(16), {**QUIET, "skip": ()})
    compiled = _compile(model, skip=())
    with torch.no_grad():
        logits = compiled(**batch(8)).logits
        assert isinstance(model.lm_head.weight, ReleasedWeight) and torch.equal(embed, rows)
        torch.testing.assert_close(logits, model(**batch(8)).logits, atol=1e-5, rtol=1e-5)  # eager: the same
        torch.testing.assert_close(logits, copy.deepcopy(model)(**batch(8)).logits, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_gradient_checkpointing_layers_are_quantized_and_gradients_match(inner):
    # Non-reentrant checkpointing puts each decoder layer in a higher-order op's body: the linears are
    # rewritten there, and the region is still recomputed in the backward, with the forward's dropout masks
    # (inner="eager" runs such a graph through aot_eager: as it is, the recomputation drew new ones)
    model = tiny_peft_llama(dropout=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()  # its hook breaks the graph; non-reentrant checkpointing needs none
    compiled = _compile(model, inner=inner)
    data = batch(16)
    counters.clear()
    with warnings.catch_warnings(), torch._inductor.config.patch(fallback_random=True):  # eager's random numbers
        warnings.filterwarnings("error", message="lowra: no loss gradient")  # Fisher statistics reach every layer
        compiled(**data).loss.backward()
        assert not counters["graph_break"]
        frozen = [p for p in model.parameters() if packed_weight(p) is not None]
        assert len(frozen) == 14 and all(isinstance(p, ReleasedWeight) for p in frozen)
        model.zero_grad(set_to_none=True)
        reference = copy.deepcopy(model)
        torch.manual_seed(1)
        loss = compiled(**data).loss
        loss.backward()
    torch.manual_seed(1)
    ref_loss = reference(**data).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    got, want = _lora_grads(model), _lora_grads(reference)
    assert len(got) == 28
    for name in got:
        assert (got[name] - want[name]).abs().max() <= 1e-5, name


def test_reentrant_checkpointing_trains_as_the_dequantized_model_and_quantize_ahead_plans_it_on_the_loss():
    # Reentrant checkpointing (transformers' choice when no kwargs say otherwise in older versions, and
    # many QLoRA scripts') breaks the graph at every layer. Compiled straight away it still trains exactly,
    # but no graph has the loss: the warning names both ways out. quantize_ gets every layer's E[g^2].
    model = tiny_peft_llama(layers=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    compiled = _compile(model)
    with pytest.warns(UserWarning, match="no loss gradient.*'use_reentrant': False.*quantize_"):
        compiled(**batch(16)).loss.backward()
    assert len([p for p in model.parameters() if isinstance(p, ReleasedWeight)]) == 7
    step_matches_the_dequantized_model(compiled, model, batch(16, seed=1))

    model = tiny_peft_llama(layers=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no loss gradient")
        lowra_compile.quantize_(model, batch(16), QUIET)


class _Policy(torch.nn.Module):
    """A module around a compiled model (a value head's, a distillation's): not a part of the model's names."""

    def __init__(self, model):
        super().__init__()
        self.policy = model

    def forward(self, **batch):
        return self.policy(**batch)


@pytest.mark.parametrize("how", ["compiled", "compiled inside another module", "quantized ahead"])
def test_a_graph_cut_out_of_the_model_names_its_layers_and_takes_skip_as_the_model_names_them(how):
    # reentrant checkpointing breaks the graph inside the model: its graphs' parameter names started at the
    # module compiled ('layers.0.self_attn...'), so a skip of the name report() and named_parameters() give
    # packed the layer anyway, and the warnings named layers by a path the model does not have
    model = tiny_peft_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    options = {**QUIET, "skip": ("base_model.model.model.layers.0.mlp",)}
    ahead = how == "quantized ahead"
    with pytest.warns(UserWarning) as caught:
        if ahead:
            lowra_compile.quantize_(model, batch(16), options)
        elif how == "compiled":
            _compile(model, **options)(**batch(16)).loss.backward()
        else:
            _Policy(_compile(model, **options))(**batch(16)).loss.backward()
    packed = [n for n, p in model.named_parameters() if isinstance(p, ReleasedWeight)]
    assert len(packed) == 12 and not [n for n in packed if "layers.0.mlp" in n]  # 14 linears and lm_head, 3 skipped
    names = re.findall(r"layer\(s\) \(e.g. '([^']+)'", " ".join(str(w.message) for w in caught))
    assert ahead or names and all(name in dict(model.named_parameters()) for name in names)  # ahead: no such warning


class _SelfNamedS(torch.nn.Module):
    """A forward that names its module `s`, with a graph break inside."""

    def __init__(s):
        super().__init__()
        s.up, s.down = torch.nn.Linear(128, 128, bias=False), torch.nn.Linear(128, 128, bias=False)

    def forward(s, x):
        y = s.up(x)
        torch._dynamo.graph_break()
        return s.down(torch.relu(y))


class _BodyAndHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = _SelfNamedS().requires_grad_(False), torch.nn.Linear(128, 8)

    def forward(self, x):
        return self.head(self.body(x))


def test_graph_pieces_name_modules_a_forward_calls_otherwise_than_self_and_those_on_dynamos_stack():
    # the pieces' names came from the local `self` alone: a forward's `s` and the `self.head` that Dynamo keeps
    # on its stack across the break (`___stack0`) were named from themselves ('down.weight', 'weight'), and a
    # skip of the model's name for the layer was ignored
    model = _BodyAndHead()
    with pytest.warns(UserWarning) as caught:
        _compile(model, skip=("body.down",))(torch.randn(2, 32, 128)).sum().backward()
    assert [n for n, p in model.named_parameters() if isinstance(p, ReleasedWeight)] == ["body.up.weight"]
    names = re.findall(r"\(e\.g\. '([^']+)'", " ".join(str(w.message) for w in caught))
    assert names and all(name in dict(model.named_parameters()) for name in names)


def test_a_recompile_of_checkpointed_layers_fuses_their_lora_branches_again(monkeypatch):
    # Another sequence length recompiles; the checkpoint bodies then read the released weights' packed ops.
    import lowra_compile.backend as backend

    graphs = []
    inner = backend._compile_inner
    monkeypatch.setattr(backend, "_compile_inner", lambda gm, *args: graphs.append(gm) or inner(gm, *args))
    model = tiny_peft_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    compiled = _compile(model)
    compiled(**batch(16)).loss.backward()
    first = len(graphs)
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    data = batch(12)
    compiled(**data).loss.backward()
    reference(**data).loss.backward()
    assert len(graphs) > first  # a recompile
    bodies = [getattr(gm, n.args[0].target) for gm in graphs[first:] for n in gm.graph.nodes
              if n.target is torch.ops.higher_order.tag_activation_checkpoint]
    ops = [n for body in bodies for n in body.graph.nodes if n.target is torch.ops.lowra.lora_linear.default]
    assert len(ops) == 14 and all(n.args[5] is not None for n in ops)  # LoRA inside the op, not beside it
    got, want = _lora_grads(model), _lora_grads(reference)
    for name in got:
        assert (got[name] - want[name]).abs().max() <= 1e-5, name


class _HandWrittenLora(torch.nn.Module):
    """Two frozen linears with a LoRA branch written by hand, as other fine-tuning libraries spell it."""

    def __init__(self, spelling: str):
        super().__init__()
        torch.manual_seed(0)
        self.spelling, self.scaling, self.rank = spelling, 2.0, 4
        self.base = torch.nn.Linear(64, 64, bias=False).requires_grad_(False)
        self.head = torch.nn.Linear(64, 64, bias=False).requires_grad_(False)
        self.lora_a = torch.nn.Linear(64, self.rank, bias=False)
        self.lora_b = torch.nn.Linear(self.rank, 64, bias=False)
        torch.nn.init.normal_(self.lora_b.weight, std=0.05)  # non-zero: the branch changes the output
        self.trained_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.register_buffer("channel_scales", torch.linspace(0.5, 2.0, 64))

    def branch(self, x):
        a, b = self.lora_a, self.lora_b
        if self.spelling == "s * B(A(x))":  # torchtune's LoRALinear
            return self.scaling * b(a(x))
        if self.spelling == "(x @ A.T @ B.T) * s":  # litgpt's LoRALinear
            return (x @ a.weight.transpose(0, 1) @ b.weight.transpose(0, 1)) * self.scaling
        if self.spelling == "B(A(x)) / r":
            return b(a(x)) / self.rank
        if self.spelling == "B(A(x)) * trained s":
            return b(a(x)) * self.trained_scale
        if self.spelling == "B(A(x)) * s per channel":
            return b(a(x)) * self.channel_scales
        if self.spelling == "B(A(x)) * computed s":
            return b(a(x)) * self.channel_scales.mean()
        if self.spelling == "B(A(x)) * 0":
            return b(a(x)) * 0.0
        return b(a(x))  # no scaling

    def forward(self, x):
        if self.spelling == "add(y, B(A(x)) * s, alpha=a)":
            h = torch.add(self.base(x), self.lora_b(self.lora_a(x)) * self.scaling, alpha=0.5)
        else:
            h = self.base(x) + self.branch(x)
        return CausalLMOutput(loss=self.head(torch.relu(h)).pow(2).mean())


@pytest.mark.parametrize("spelling", ["s * B(A(x))", "(x @ A.T @ B.T) * s", "B(A(x)) / r", "B(A(x))",
                                      "B(A(x)) * trained s", "B(A(x)) * s per channel", "add(y, B(A(x)) * s, alpha=a)"])
def test_a_lora_branch_written_by_hand_is_fused_where_the_op_can_take_its_scaling_and_trains_as_the_dequantized_model(spelling, monkeypatch):
    # unscaled, divided, and litgpt's matrix products of the factors ran unfused, the branch as ordinary ops;
    # a trainable scale was fused as a float and got no gradient, a per-channel one failed in the op, and
    # torch.add's alpha was dropped (a wrong output): those now run unfused, beside the packed layer
    graphs = _rewritten_graphs(monkeypatch)
    model, data = _HandWrittenLora(spelling), {"x": torch.randn(4, 8, 64)}
    assert_trains_as_dequantized(model, data)
    ops = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.lowra.lora_linear.default]
    fused = [n.args[7] for n in ops if n.args[5] is not None]  # the head has no adapter
    assert len(ops) == 2 and fused == {"s * B(A(x))": [2.0], "(x @ A.T @ B.T) * s": [2.0], "B(A(x)) / r": [0.25],
                                       "B(A(x))": [1.0]}.get(spelling, [])


@pytest.mark.parametrize("spelling", ["B(A(x)) * computed s", "B(A(x)) * 0"])
def test_a_fresh_hand_written_adapter_with_a_computed_or_zero_scaling_trains_as_the_dequantized_model(spelling):
    # B zero, so LoftQ would start the adapter from its scaling: it raised "cannot read the LoRA scaling from graph
    # node" for a scaling computed in the forward (now unfused) and "needs a non-zero LoRA scaling" for 0 (now
    # fused, not started: there is nothing to start)
    model = _HandWrittenLora(spelling)
    torch.nn.init.zeros_(model.lora_b.weight)
    assert_trains_as_dequantized(model, {"x": torch.randn(4, 8, 64)})


class _Int8Linear(torch.nn.Module):
    """A linear layer another library quantized: int8 codes and a scale per row (as bitsandbytes' Linear8bitLt)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.weight = torch.nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale)


@pytest.mark.parametrize("ahead", [False, True])
def test_layers_another_library_quantized_are_named_in_a_warning_and_run_as_they_are(ahead):
    # a QLoRA user who kept quantization_config got bitsandbytes' base under backend="lowra", with no word that
    # lowra packed none of those layers
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.q_proj = _Int8Linear(layer.self_attn.q_proj)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"])).train()
    message = r"lowra: 2 layer\(s\) hold weights another library quantized already \(e.g. '.*layers.0.self_attn.q_proj', a _Int8Linear\)"
    with pytest.warns(UserWarning, match=message):
        if ahead:
            lowra_compile.quantize_(model, batch(16), QUIET)
        else:
            _compile(model)(**batch(16)).loss.backward()
    assert len(lowra_compile.report(model).layers) == 12  # the other 6 linears of each layer are packed
    assert_trains_as_dequantized(model, batch(16))


def test_a_model_of_float_weights_gets_no_warning_of_another_library_s_quantization():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compile(tiny_peft_llama())(**batch(16)).loss.backward()
    assert not [w for w in caught if "another library" in str(w.message)]


def test_multiple_active_adapters_fuse_the_first_and_warn():
    from peft import LoraConfig

    model = tiny_peft_llama()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # non-zero: both adapters change the output
    compiled = _compile(model, loftq_iters=0)
    with pytest.warns(UserWarning, match="several active LoRA adapters"):
        compiled(**batch(8)).loss.backward()
    _compiled_matches_eager(model, compiled, batch(8, seed=1))


def test_report_table_json_and_markdown():
    model = tiny_peft_llama()
    compiled = _compile(model, bits=1.5)
    compiled(**batch(8)).loss.backward()
    rep = lowra_compile.report(compiled)
    assert len(rep.layers) == 14 and abs(rep.code_bits - 1.5) <= 0.01
    assert rep.effective_bits > rep.code_bits and rep.bytes_packed < rep.bytes_dense / 8
    text = str(rep)
    assert "q_proj" in text and "effective bits" in text
    assert rep.dense == ("base_model.model.lm_head.weight",)  # skipped by default: the one frozen linear left
    assert "1 frozen linear weight(s) stay dense: base_model.model.lm_head.weight" in text
    import json

    data = json.loads(rep.to_json())
    assert data["summary"]["layers"] == 14 and data["summary"]["dense"] == ["base_model.model.lm_head.weight"]
    assert rep.to_markdown().startswith("| layer |")
    channels = data["summary"]["channels_per_bits"]  # every channel at one width
    assert sum(channels.values()) == sum(r.shape[0] for r in rep.layers)
    assert all("lora_linear:reference" in r.kernels for r in rep.layers)  # the ops that ran on its shape
    # quantize time per stage: the whole-model stages are shared equally between the layers
    stages = {"calibrate", "quantize", "plan", "pack", "loftq"}
    assert all(set(r.seconds) == stages and min(r.seconds.values()) >= 0 for r in rep.layers)
    assert len({r.seconds["calibrate"] for r in rep.layers}) == 1 and len({r.seconds["plan"] for r in rep.layers}) == 1
    assert sum(rep.seconds.values()) > 0 and set(data["summary"]["seconds"]) == stages and "quantized in" in text



def test_report_lists_only_the_kernels_run_on_layers_of_the_same_widths():
    # the kernel log is process-wide: a layer of another model of the same shape, planned at other widths,
    # must not lend this one its kernels
    x = torch.randn(16, 64)
    ran = torch.nn.Linear(64, 64).requires_grad_(False)
    # a model that is one Linear: its weight is "weight", which a graph was called with
    assert not _warnings_saying("no compiled graph", lambda: lowra_compile.quantize_(ran, {"input": x}, {**QUIET, "bits": 4.0}))
    lowra_compile.codegen.clear_log()
    ran(x)
    idle = torch.nn.Linear(64, 64).requires_grad_(False)
    lowra_compile.quantize_(idle, {"input": x}, {**QUIET, "bits": 2.0})
    assert lowra_compile.report(idle).layers[0].kernels == ()
    assert lowra_compile.report(ran).layers[0].kernels != ()

def test_graphs_read_the_packed_base_of_the_weights_they_are_called_with_and_keep_none(tmp_path):
    # the graph compiled on the quantizing step runs for any model whose weights Dynamo's guards let through:
    # a second model loaded from the first's base (a resume in the same process), a base loaded afterwards
    first = tiny_peft_llama()
    compiled = _compile(first)
    compiled(**batch(16)).loss.backward()
    lowra_compile.save_quantized(first, tmp_path / "base.safetensors")
    first_packed = [weakref.ref(t) for p in first.parameters() for t in getattr(p, "_lowra_packed", ())]
    del first, compiled
    gc.collect()
    assert len(first_packed) == 14 * 11 and all(t() is None for t in first_packed)  # the graph kept none

    second = lowra_compile.load_quantized(tiny_peft_llama(seed=1), tmp_path / "base.safetensors")
    compiled = _compile(second)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*run the graph eagerly, unfused")
        compiled(**batch(16)).loss.backward()
        lowra_compile.codegen.clear_log()
        step_matches_the_dequantized_model(compiled, second, batch(16, seed=1))
    fused = [e for e in lowra_compile.codegen.kernel_log() if e["op"] == "lora_linear" and e["rank"] == 4]
    assert sum(e["calls"] for e in fused) == 14  # compiled and fused (the reference runs unfused, eagerly)

    other = lowra_compile.quantize_(tiny_peft_llama(seed=2), batch(16), {**QUIET, "bits": 3.0})
    lowra_compile.save_quantized(other, tmp_path / "other.safetensors")
    lowra_compile.load_quantized(second, tmp_path / "other.safetensors")  # another base, another plan
    step_matches_the_dequantized_model(compiled, second, batch(16, seed=2))


def test_save_and_load_quantized_base_skips_requantization(tmp_path, monkeypatch):
    model = tiny_peft_llama()
    compiled = _compile(model)
    data = batch(8)
    compiled(**data).loss.backward()
    path = tmp_path / "base.lowra.safetensors"
    assert lowra_compile.save_quantized(compiled, path) == 14
    with torch.no_grad():
        want = compiled(**data).logits

    fresh = tiny_peft_llama(seed=3)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if packed_weight(v) is None}, strict=False)
    lowra_compile.load_quantized(fresh, path)
    assert sum(isinstance(p, ReleasedWeight) for p in fresh.parameters()) == 14
    assert lowra_compile.report(fresh).seconds == {}  # loaded, not quantized here
    monkeypatch.setattr(lowra_compile.passes.pipeline, "quantize_layer_cached", None)  # must not be called
    torch._dynamo.reset()
    with torch.no_grad():
        got = _compile(fresh)(**data).logits
    torch.testing.assert_close(got, want)


def _warnings_saying(text: str, fn) -> list[str]:
    """The messages of the warnings that `fn()` raises and that contain `text`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if text in str(w.message)]


def _kept_quantization_warnings(fn) -> list[str]:
    return _warnings_saying("quantized earlier", fn)


def test_a_compile_asking_other_quantizing_options_of_a_packed_model_warns(tmp_path):
    # The packed base stays as it is (its dense weights are gone): a compile at another budget must say so
    # rather than train the old base. Options left at their defaults ask nothing, as after quantize_.
    model = tiny_peft_llama()
    data = batch(8)
    lowra_compile.quantize_(model, data, {"bits": 1.5, "progress": False})
    assert not _kept_quantization_warnings(lambda: _compile(model)(**data))
    torch._dynamo.reset()
    assert not _kept_quantization_warnings(lambda: _compile(model, bits=1.5, group_size=64)(**data))
    torch._dynamo.reset()
    config = lowra_compile.LowRAConfig(kernels="reference", progress=False)  # a config object asks what it changes
    assert not _kept_quantization_warnings(lambda: torch.compile(model, backend="lowra", options=config)(**data))
    torch._dynamo.reset()
    config = lowra_compile.LowRAConfig(bits=3.0, progress=False)
    (message,) = _kept_quantization_warnings(lambda: torch.compile(model, backend="lowra", options=config)(**data))
    assert "bits=1.5;" in message and "bits=3.0 asked for now does not apply" in message
    torch._dynamo.reset()
    (message,) = _kept_quantization_warnings(lambda: _compile(model, bits=3.0, group_size=32)(**data))
    assert "14 layer(s)" in message and "bits=1.5, group_size=64" in message and "bits=3.0, group_size=32" in message

    model.to(torch.float64)  # a cast keeps them
    lowra_compile.save_quantized(model, tmp_path / "base.safetensors")  # so does a checkpoint
    fresh = lowra_compile.load_quantized(tiny_peft_llama(seed=3), tmp_path / "base.safetensors")
    torch._dynamo.reset()
    (message,) = _kept_quantization_warnings(lambda: _compile(fresh, bits=2.0)(**data))
    assert "bits=1.5;" in message
    assert lowra_compile.report(fresh).code_bits == pytest.approx(1.5, abs=0.05)


def test_a_compile_skipping_packed_layers_warns_that_they_stay_packed():
    # skip keeps a layer dense only before it is quantized: asked of a packed one it changed nothing, silently
    model = tiny_peft_llama()
    data = batch(8)
    lowra_compile.quantize_(model, data, {"bits": 2.0, "progress": False})
    assert not _warnings_saying("stay packed", lambda: _compile(model, skip=("lm_head",))(**data))  # none packed
    torch._dynamo.reset()
    (message,) = _warnings_saying("stay packed", lambda: _compile(model, skip=("lm_head", "q_proj"))(**data))
    assert "names 2 layer(s) quantized earlier" in message and "q_proj" in message and "materialize" in message
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14  # still packed


def test_quantize_ahead_warns_of_a_skip_entry_that_names_nothing():
    # a name from before PEFT wrapped the model (no '.base_layer'), or a typo, kept nothing dense, silently
    model = tiny_peft_llama()
    skip = ("model.layers.1.mlp.down_proj.weight", "lm_head", "layers.0.self_attn")
    (message,) = _warnings_saying("skip entry", lambda: lowra_compile.quantize_(model, batch(8), {"skip": skip, "progress": False}))
    assert "'model.layers.1.mlp.down_proj.weight' is part of no parameter or module name" in message
    assert "'base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight'" in message  # a name to copy
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14 - 4  # the other entries did skip
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64)).requires_grad_(False)  # no lm_head: the default asks nothing
    assert not _warnings_saying("skip entry", lambda: lowra_compile.quantize_(mlp, {"input": torch.randn(8, 64)}, QUIET))



def test_quantize_ahead_warns_of_frozen_linears_no_compiled_graph_called():
    # a forward Dynamo runs eagerly (here under torch._dynamo.disable; a graph break inside a loop does the same)
    # calls its linears outside any graph: quantize_ returned with nothing packed and no word
    model = tiny_peft_llama()
    layers = model.base_model.model.model.layers
    layers[1].forward = torch._dynamo.disable(layers[1].forward)
    (message,) = _warnings_saying("called in no compiled graph", lambda: lowra_compile.quantize_(model, batch(8), QUIET))
    assert message.startswith("lowra: 7 frozen linear weight(s)") and "(e.g. 'base_model.model.model.layers.1." in message
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 7  # layer 0's
    packed = tiny_peft_llama()
    lowra_compile.quantize_(packed, batch(8), QUIET)
    assert not _warnings_saying("no compiled graph", lambda: lowra_compile.quantize_(packed, batch(8), QUIET))

def _packed_tensors(model) -> list[torch.Tensor]:
    return [t for p in model.parameters() if isinstance(p, ReleasedWeight) for t in p._lowra_packed]


def test_quantize_ahead_calibrates_on_every_batch_of_a_list(planned_statistics):
    # More tokens than fit in one batch: the batches run one at a time and their statistics add up.
    seen = planned_statistics
    batches = [batch(16, size=2, seed=s) for s in range(3)]
    model = lowra_compile.quantize_(tiny_peft_llama(), batches, {"progress": False})
    [stats] = seen
    assert len(stats) == 14 and all(s.tokens == 3 * 2 * 16 and s.g2 is not None for s in stats)
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14

    # layers inside checkpointed regions (recorded by a nested interpreter) add up over the batches too
    seen.clear()
    checkpointed = tiny_peft_llama()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.disable_input_require_grads()
    lowra_compile.quantize_(checkpointed, batches, {"progress": False})
    [stats] = seen
    assert len(stats) == 14 and all(s.tokens == 3 * 2 * 16 and s.g2 is not None for s in stats)

    # batches need not have one shape: the recording compile follows them
    seen.clear()
    lowra_compile.quantize_(tiny_peft_llama(), [batch(16), batch(8, size=3)], {"progress": False})
    assert all(s.tokens == 2 * 16 + 3 * 8 for s in seen[0])

    # the same batch twice sums to the same means (nearest rounding: no damping by token count), so the same model
    options = {"progress": False, "rounding": "nearest"}
    once = lowra_compile.quantize_(tiny_peft_llama(), batches[0], options)
    twice = lowra_compile.quantize_(tiny_peft_llama(), [batches[0], batches[0]], options)
    for a, b in zip(_packed_tensors(once), _packed_tensors(twice), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _six_layer_peft_llama():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(layers=6), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    model.train()
    return model


def test_quantize_ahead_calibrates_across_graph_breaks_and_plans_the_whole_model(planned_statistics):
    # A graph break in every MLP of a 6-layer model. The backend alone would give the layers before each
    # break no loss gradient (all fall back to E[x^2]), plan each graph on its own, and stop quantizing at
    # Dynamo's recompile limit (5 here: 8 by default). quantize_ runs the whole model: every layer gets the same
    # statistics as in the unbroken model, one plan meets the budget, all of them are packed, and all of
    # them train fused.
    seen = planned_statistics
    batches = [batch(16, seed=s) for s in range(2)]
    options = {"progress": False, "bits": 2.0}
    lowra_compile.quantize_(_six_layer_peft_llama(), batches, options)
    model = _six_layer_peft_llama()
    _break_the_graph_in_every_mlp(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no loss gradient")
        lowra_compile.quantize_(model, batches, options)
    unbroken, broken = seen
    assert len(broken) == 42  # 7 linears in each of the 6 layers, 2 of them with LoRA
    for a, b in zip(unbroken, broken, strict=True):
        torch.testing.assert_close(b.x2, a.x2)
        torch.testing.assert_close(b.g2, a.g2)
        assert b.tokens == 2 * 2 * 16
    frozen = [p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2 and "lora" not in n]
    assert len(frozen) == 42 and all(isinstance(p, ReleasedWeight) for p in frozen)
    assert lowra_compile.report(model).code_bits == pytest.approx(2.0, abs=0.01)
    lowra_compile.codegen.clear_log()
    with torch._dynamo.config.patch(recompile_limit=5):  # transformers' own frames take 4 of them
        step_matches_the_dequantized_model(_compile(model), model, batch(16, seed=3))
    # Each layer's packed tensors have their own row counts, and yet one graph of the MLP's frame (and of the
    # attention's) serves every layer: all 6 ran their LoRA fused into the packed op. Before, that frame
    # recompiled per layer and, past Dynamo's recompile limit, layers ran eagerly, their LoRA apart.
    fused = [e for e in lowra_compile.codegen.kernel_log() if e["op"] == "lora_linear" and e["rank"] == 4]
    assert sum(e["calls"] for e in fused) == 2 * 6


def test_packing_adds_the_per_layer_packed_sources_to_the_user_s_dynamic_sources_once():
    import re

    from lowra_compile.passes.release import PER_LAYER_PACKED_SOURCES, attach
    from lowra_compile.runtime.synthetic import random_packed_weight

    with torch.compiler.config.patch(dynamic_sources="L['x']"):
        for _ in range(2):
            attach(torch.nn.Parameter(torch.zeros(8, 64), requires_grad=False), random_packed_weight(8, 64))
        assert torch.compiler.config.dynamic_sources.split(",") == ["L['x']", PER_LAYER_PACKED_SOURCES]
    one_layer = "L['self']._modules['down_proj']._modules['base_layer']._parameters['weight']._lowra_packed["
    whole_stack = "L['self']._modules['model']._modules['layers']._modules['3']._modules['mlp']._parameters['weight']._lowra_packed["
    assert re.match(PER_LAYER_PACKED_SOURCES, one_layer + "3]") and re.match(PER_LAYER_PACKED_SOURCES, one_layer + "10]")
    assert not re.match(PER_LAYER_PACKED_SOURCES, one_layer + "0]")  # perm: one row count for every layer
    assert not re.match(PER_LAYER_PACKED_SOURCES, whole_stack + "3]")


def test_quantize_ahead_packs_what_the_backend_packs_on_the_same_batch():
    ahead = lowra_compile.quantize_(tiny_peft_llama(), batch(16), {"progress": False})
    compiled_model = tiny_peft_llama()
    _compile(compiled_model)(**batch(16))
    for a, b in zip(_packed_tensors(ahead), _packed_tensors(compiled_model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(_trainable(ahead), _trainable(compiled_model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same LoftQ adapters


@pytest.mark.parametrize("loss", ["nan", "zero"])
def test_a_first_batch_without_a_label_plans_on_activations_not_at_the_smallest_width(loss):
    # every label -100 (completion-only fine-tuning, a truncated answer): the mean loss is NaN, or 0 where the
    # Trainer divides by the tokens of all accumulated batches; its gradients made every error NaN or 0 and
    # the plan put every channel at 1 bit
    data = {**batch(16), "labels": torch.full_like(batch(16)["labels"], -100)}
    if loss == "zero":
        data["num_items_in_batch"] = torch.tensor(16)
    model = tiny_peft_llama()
    with pytest.warns(UserWarning, match="no loss gradient reached 14 layer"):
        _compile(model, bits=2.0)(**data)
    rep = lowra_compile.report(model)
    assert abs(rep.code_bits - 2.0) <= 0.01 and rep.summary()["channels_per_bits"][2] > 0


def test_quantize_ahead_without_labels_plans_on_activations_and_says_to_give_labels(planned_statistics):
    model = tiny_peft_llama()
    with pytest.warns(UserWarning, match=r"no loss gradient reached 14 layer\(s\) \(e.g. 'base_model.model.model."
                      r"layers.0.self_attn.q_proj.base_layer.weight'\).*training batches with labels"):
        lowra_compile.quantize_(model, {"input_ids": batch(16)["input_ids"]}, {"progress": False})
    [stats] = planned_statistics
    assert all(s.g2 is None and s.x2 is not None for s in stats)


def test_quantize_ahead_rejects_no_batch_and_batches_that_are_not_kwargs():
    model = tiny_peft_llama()
    with pytest.raises(ValueError, match="at least one example batch"):
        lowra_compile.quantize_(model, [])
    with pytest.raises(ValueError, match=r"calibration batch 1 is a Tensor; give each batch as the kwargs"):
        lowra_compile.quantize_(model, [batch(8), batch(8)["input_ids"]])
    for nothing in (None, 0):  # was list()'s TypeError
        with pytest.raises(ValueError, match=f"or a list or iterable of them, not a {type(nothing).__name__}"):
            lowra_compile.quantize_(model, nothing)
    assert not any(isinstance(p, ReleasedWeight) for p in model.parameters())  # checked before any work


def test_quantize_ahead_without_calibration_runs_the_first_batch_only():
    # the first batch finds the layers; with calibrate="off" the others would be run for nothing (this one
    # cannot run at all: its ids are past the vocabulary)
    out_of_vocabulary = {"input_ids": torch.full((2, 8), 10**6), "labels": torch.full((2, 8), 10**6)}
    model = lowra_compile.quantize_(tiny_peft_llama(), [batch(8), out_of_vocabulary], {"calibrate": "off", "progress": False})
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14


def test_quantize_ahead_takes_the_first_batches_of_a_data_loader():
    # what a training script has at hand: a DataLoader, cut to its first batches
    options = {"progress": False, "rounding": "nearest"}
    first = batch(16, size=2)
    listed = lowra_compile.quantize_(tiny_peft_llama(), [first, first], options)
    loader = torch.utils.data.DataLoader([first] * 5, batch_size=None)
    loaded = lowra_compile.quantize_(tiny_peft_llama(), itertools.islice(loader, 2), options)
    for a, b in zip(_packed_tensors(listed), _packed_tensors(loaded), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_calibration_batch_s_tensors_move_item_by_item_and_nested_and_the_rest_stays():
    from transformers import BatchEncoding

    from lowra_compile.recording import _moved

    ids = torch.ones(2, 3, dtype=torch.long)
    encoded = BatchEncoding({"input_ids": ids, "attention_mask": ids})  # a Mapping pytree does not open
    moved = _moved({**encoded, "past": [ids, (ids, None)], "use_cache": False}, torch.device("meta"))
    assert moved["input_ids"].is_meta and moved["attention_mask"].is_meta and moved["input_ids"].dtype == torch.long
    assert moved["past"][0].is_meta and moved["past"][1][0].is_meta and moved["past"][1][1] is None
    assert moved["use_cache"] is False
    assert _moved(encoded, torch.device("meta"))["input_ids"].is_meta
    assert _moved(encoded, None) is encoded  # a model spread over devices moves its inputs itself


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantize_ahead_moves_the_batches_to_the_model_s_gpu():
    # a DataLoader gives CPU tensors; the training loop moves them, and so does quantize_
    on_cpu = [batch(16, size=2, seed=s) for s in range(2)]
    on_gpu = [{k: v.cuda() for k, v in b.items()} for b in on_cpu]
    options = {"progress": False, "rounding": "nearest"}
    moved = lowra_compile.quantize_(tiny_peft_llama().cuda(), on_cpu, options)
    given = lowra_compile.quantize_(tiny_peft_llama().cuda(), on_gpu, options)
    for a, b in zip(_packed_tensors(moved), _packed_tensors(given), strict=True):
        assert a.is_cuda
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter"])
def test_peft_s_own_merge_raises_naming_lowra_merge(merge):
    model = tiny_peft_llama()
    _compile(model)(**batch(8))
    with pytest.raises(RuntimeError, match=r"lowra_compile.merge\(model\)") as raised:
        getattr(model, merge)()
    assert merge in str(raised.value)


def _step(model, data):
    return model(**data).loss


@pytest.mark.parametrize(("dora", "how"), [(False, "model"), (True, "model"), (False, "step"), (False, "ahead")])
def test_a_quantizing_call_under_disable_adapter_starts_the_adapters_as_a_call_that_runs_them(dora, how):
    # a DPO-style reference pass under disable_adapter() first: the adapters were in no graph, so LoftQ left them
    # at B = 0 and DoRA's magnitude at the dense weight's norm, silently. B is zero at the start, so both calls
    # see the same activations and must start alike
    models = [tiny_peft_llama(use_dora=dora) for _ in range(2)]
    for model, disabled in zip(models, (False, True)):
        with torch.no_grad(), model.disable_adapter() if disabled else contextlib.nullcontext():
            if how == "ahead":
                lowra_compile.quantize_(model, batch(8), QUIET)
            elif how == "step":  # a compiled function calling the model: no module call on the stack
                torch.compile(_step, backend="lowra", options=QUIET)(model, batch(8))
            else:
                _compile(model)(**batch(8))
    adapters = [{n: p for n, p in m.named_parameters() if "lora_" in n} for m in models]
    assert adapters[0].keys() == adapters[1].keys() and any("lora_B" in n for n in adapters[0])
    for name, p in adapters[1].items():
        torch.testing.assert_close(p, adapters[0][name], rtol=0, atol=0)
        assert "lora_B" not in name or p.any()
        assert p.requires_grad  # PEFT gave the adapters back their gradients
    for a, b in zip(_packed_tensors(models[0]), _packed_tensors(models[1]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_base_with_a_merged_adapter_warns_that_it_is_quantized_for_good():
    model = tiny_peft_llama()
    model.merge_adapter()
    with pytest.warns(UserWarning, match=r"14 PEFT layer\(s\) .*merged into the base") as caught, torch.no_grad():
        _compile(model)(**batch(8))
    [message] = [str(w.message) for w in caught if "merged into the base" in str(w.message)]
    assert "base_layer.weight" in message and "cannot be unmerged" in message
    assert not any(p.any() for n, p in model.named_parameters() if "lora_B" in n)  # no LoftQ on top of a merge
    with pytest.raises(RuntimeError, match=r"unmerge_adapter write so.*cannot be unmerged"):
        model.unmerge_adapter()  # its write into the packed base would be lost: it raises, naming the case


@pytest.mark.parametrize("dora", [False, True])
def test_merge_folds_adapters_into_the_dequantized_base(dora):
    model = tiny_peft_llama(use_dora=dora)
    compiled = _compile(model)
    data = batch(8)
    compiled(**data).loss.backward()  # LoftQ makes the adapters non-zero
    with torch.no_grad():
        want = compiled(**data).logits
    merged = lowra_compile.merge(model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**data).logits, want, atol=1e-4, rtol=1e-4)


def test_report_and_merge_see_the_model_inside_ddp_and_compile_wrappers():
    # torch.compile(DDP(model)) names every parameter `_orig_mod.module. ...`: the report listed the layers so,
    # and merge refused the wrapper as no PEFT model
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, data = tiny_peft_llama(), batch(8)
        lowra_compile.quantize_(model, data, {"progress": False})
        wrapped = torch.compile(DistributedDataParallel(model), backend="lowra", options={"inner": "eager"})
        wrapped(**data).loss.backward()
        names = [row.name for row in lowra_compile.report(wrapped).layers]
        assert names == [n for n, p in model.named_parameters() if isinstance(p, ReleasedWeight)]
        with torch.no_grad():
            want = model(**data).logits
        merged = lowra_compile.merge(wrapped)
        with torch.no_grad():
            torch.testing.assert_close(merged(**data).logits, want, atol=1e-4, rtol=1e-4)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


@pytest.mark.parametrize("scope", ["model", "layers"])
def test_a_model_compiled_in_place_runs_its_merged_base_dense_after_merge(scope):
    # the Trainer holds the PEFT model it compiled in place, and evaluates it after the merge
    model = tiny_peft_llama()
    options = {"progress": False, "inner": "eager"}
    for module in [model] if scope == "model" else model.base_model.model.model.layers:
        module.compile(backend="lowra", options=options)
    data = batch(8)
    model(**data).loss.backward()
    merged = lowra_compile.merge(model)
    with torch.no_grad():
        want = merged(**data).logits
        got = model(**data).logits  # compiled, it would quantize the merged weights again, in place
    assert not any(isinstance(p, ReleasedWeight) for p in merged.parameters())
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bfloat16_model_trains_as_the_dequantized_model():
    model = tiny_peft_llama().to(torch.bfloat16)
    compiled = _compile(model)
    losses = _train(compiled, model, steps=3)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    released = [p for p in model.parameters() if isinstance(p, ReleasedWeight)]
    assert len(released) == 14 and all(p.dtype == torch.bfloat16 for p in released)
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    data = batch(16)
    out, ref = compiled(**data), reference(**data)
    out.loss.backward()
    ref.loss.backward()
    # bf16 products, summed in another order by the fused op
    torch.testing.assert_close(out.loss, ref.loss, atol=0, rtol=1e-2)
    _assert_lora_grads_close(model, reference)


@pytest.mark.parametrize("half", ["model.half()", "float16 autocast"])
def test_a_float16_first_call_quantizes_and_trains_as_the_dequantized_model(half):
    # float16 graphs take the loss gradients scaled (calibrate._loss_gradients), and the backend quantizes under
    # no_grad: the scaled loss had no grad_fn, and the first call raised "element 0 of tensors does not require grad"
    model = tiny_peft_llama()
    if half == "model.half()":
        model.half()
    compiled = _compile(model)
    data = batch(16)
    autocast = torch.autocast("cpu", dtype=torch.float16, enabled=half != "model.half()")
    with autocast:
        first = compiled(**data).loss
    first.backward()
    assert math.isfinite(first.item())
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    with autocast:
        out, ref = compiled(**data), reference(**data)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=0, rtol=1e-2)
    _assert_lora_grads_close(model, reference)


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_training_under_autocast_matches_the_dequantized_model_under_autocast(inner):
    # Trainer(bf16=True) on a float32 model: accelerate runs the forward under torch.autocast, where each
    # linear computes in bfloat16, and so must the packed op standing in for it.
    model = tiny_peft_llama()
    compiled = _compile(model, inner=inner)
    data = batch(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(**data).loss.backward()  # quantizes
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = compiled(**data), reference(**data)
    out.loss.backward()
    ref.loss.backward()
    assert out.logits.dtype == ref.logits.dtype == torch.bfloat16
    # traced without Inductor's fusions the graph computes what the eager model does, to the last bit
    exact = inner != "inductor"
    torch.testing.assert_close(out.loss, ref.loss, atol=0 if exact else 1e-3, rtol=0 if exact else 1e-3)
    assert all(p.grad.dtype == torch.float32 for p in _trainable(model))
    _assert_lora_grads_close(model, reference)


def test_a_compiled_step_with_compiled_autograd_matches_the_eager_model():
    # A step function compiled with its loss.backward(), under compiled autograd: with inner "eager" the
    # backward graph holds the packed op's own backward, whose merged x / x_lora gradient used to be None.
    model = tiny_peft_llama()
    data = batch(16)
    _compile(model)(**data).loss.backward()  # quantizes
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)

    def step():
        loss = model(**data).loss
        loss.backward()
        return loss

    with torch._dynamo.config.patch(compiled_autograd=True):  # read by torch.compile, not by the call
        loss = torch.compile(step, backend="lowra", options=QUIET)()
    matches_the_reference(loss, model, reference, data)


def test_fsdp_sharded_layers_raise_naming_the_module_and_what_to_use(tmp_path):
    # FSDP gathers a sharded layer's dense weights for each forward: packing them would save nothing (and
    # before this check, it did so silently: a packed copy inside the graph, dense shards and an empty report)
    dist = pytest.importorskip("torch.distributed")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_peft_llama()
        for layer in model.base_model.model.model.layers:
            fsdp.fully_shard(layer)
        with pytest.raises(Exception, match="FSDPLlamaDecoderLayer, which FSDP shards.*DistributedDataParallel"):
            _compile(model)(**batch(16))
    finally:
        dist.destroy_process_group()


def test_ddp_s_graph_split_refuses_to_quantize_the_pieces_and_trains_a_base_packed_ahead(tmp_path, monkeypatch):
    # with adapters beyond DDP's first gradient bucket (1 MB; any real model's) Dynamo's DDP optimizer split
    # the graph and handed lowra each piece on stand-in tensors: calibration failed, Dynamo fell back to
    # graph breaks, and each piece was planned alone (o_proj all at 1 bit on a tiny Llama) without a word
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        data = batch(16)
        monkeypatch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 1024)  # the tiny model's adapters: 3 buckets
        split = DistributedDataParallel(tiny_peft_llama(), bucket_cap_mb=0.01)
        with pytest.raises(Exception, match=r"DDP optimizer splits.*quantize_\(model, batches\) on every rank"):
            _compile(split)(**data)
        torch._dynamo.reset()
        model = lowra_compile.quantize_(tiny_peft_llama(), data, QUIET)
        _compile(DistributedDataParallel(model, bucket_cap_mb=0.01))(**data).loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    finally:
        dist.destroy_process_group()


def test_quantize_ahead_on_a_larger_batch_then_compile_reuses_it(monkeypatch):
    # The way to calibrate on more tokens than one training batch: quantize_ on a big batch, then compile.
    model = tiny_peft_llama()
    lowra_compile.quantize_(model, batch(32, size=8), {"progress": False, "rounding": "gptq"})
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14
    assert any(m.lora_B["default"].weight.any() for m in model.modules() if hasattr(m, "lora_B"))  # LoftQ ran
    monkeypatch.setattr(lowra_compile.passes.pipeline, "quantize_layer_cached", None)  # must not be called again
    compiled = _compile(model)
    data = batch(16, seed=5)
    loss = compiled(**data).loss
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in _trainable(model))
    _compiled_matches_eager(model, compiled, data)


def test_state_dict_gives_dequantized_cpu_copies_and_loads_only_the_same_values():
    model = tiny_peft_llama()
    compiled = _compile(model)
    compiled(**batch(16)).loss.backward()
    state = model.state_dict()
    released = {n: p for n, p in model.named_parameters() if isinstance(p, ReleasedWeight)}
    assert len(released) == 14
    for name, p in released.items():
        value = state[name]
        assert type(value) is torch.Tensor and value.device.type == "cpu" and value.untyped_storage().nbytes() > 0
        torch.testing.assert_close(value, F.linear(torch.eye(p.shape[1]), p).T.contiguous())
    model.load_state_dict(state)  # its own values: accepted, nothing changes
    assert all(isinstance(p, ReleasedWeight) for p in released.values())

    model.load_state_dict({n: v.bfloat16() for n, v in state.items()})  # written in bf16: the same values
    name = next(iter(released))
    # a merged LoRA update, 0.2% of the weight's norm: it passed the norm-wise allowance and was not applied
    torch.manual_seed(0)
    update = torch.randn(state[name].shape[0], 4) @ torch.randn(4, state[name].shape[1])
    merged = dict(state, **{name: state[name] + 2e-3 * state[name].norm() / update.norm() * update})
    with pytest.raises(RuntimeError, match=r"cannot write new values into a quantized frozen weight.*materialize"):
        model.load_state_dict(merged)
    state[name] = state[name] + 0.1 * state[name].abs().mean()
    with pytest.raises(RuntimeError, match=r"cannot write new values into a quantized frozen weight.*materialize"):
        model.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"cannot write new values into a quantized frozen weight"):
        released[name].data = state[name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_dict_of_a_gpu_model_never_holds_the_dense_base_on_the_gpu():
    model = tiny_llama(layers=4, hidden=256).cuda().requires_grad_(False)
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "layers" in n)
    with torch.no_grad():
        _compile(model)(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch(16).items()})
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    state = model.state_dict()
    assert torch.cuda.max_memory_allocated() - before < dense_bytes / 4  # one layer at a time, not all of them
    assert all(state[n].device.type == "cpu" for n, p in model.named_parameters() if isinstance(p, ReleasedWeight))


def _calibration_hints(quantize) -> list[str]:
    return _warnings_saying("calibrating on", quantize)


def _quantize_ahead(batches):
    return lambda: lowra_compile.quantize_(tiny_peft_llama(), batches, {"progress": False, "rounding": "nearest"})


def test_a_small_calibration_batch_gets_a_hint_and_enough_batches_do_not():
    [hint] = _calibration_hints(lambda: _compile(tiny_peft_llama(), rounding="nearest")(**batch(16)))
    assert "calibrating on 32 tokens (the first batch)" in hint and "quantize_(model, [batch, ...]" in hint
    [hint] = _calibration_hints(_quantize_ahead(batch(16)))
    assert "calibrating on 32 tokens (1 batch)" in hint and "give lowra_compile.quantize_ more batches" in hint
    [hint] = _calibration_hints(_quantize_ahead([batch(16, seed=s) for s in range(3)]))
    assert "calibrating on 96 tokens (3 batches)" in hint and "give lowra_compile.quantize_ more batches" in hint
    assert _calibration_hints(_quantize_ahead([batch(256, size=8, seed=s) for s in range(2)])) == []  # 4,096 tokens


def test_moving_a_quantized_model_to_where_it_is_costs_nothing_and_a_cast_moves_only_the_packed_form(monkeypatch):
    model = lowra_compile.quantize_(tiny_peft_llama(), batch(16), {"progress": False})
    with torch.no_grad():
        expected = model(**batch(16)).logits
    dequantized = []
    monkeypatch.setattr(torch.ops.lowra, "dequant", lambda *a: dequantized.append(a) or torch.zeros(0))
    model.to("cpu").to(torch.float32).float()
    assert dequantized == [] and sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14
    weight = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    packed = weight._lowra_packed
    model.double()
    assert dequantized == []  # nothing dense is built: only the packed form's dtype changes
    released = [p for p in model.parameters() if isinstance(p, ReleasedWeight)]
    assert len(released) == 14 and all(p.dtype == torch.float64 and p._lowra_weight.dtype == torch.float64 for p in released)
    assert weight.untyped_storage().nbytes() == 0 and all(a is b for a, b in zip(weight._lowra_packed, packed))
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch(16)).logits.float(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"quantized frozen weight of shape .* cannot become torch.int8"):
        weight.to(torch.int8)


def _forget_graphs_before_torch_2_13():
    # Dynamo before 2.13 skips the guards of parameters whose module dicts did not change, so it runs the old
    # graphs after an in-place `model.to(...)`, for any model (docs/usage.md,
    # "Copies and moving the model"): there the user, like this test, resets.
    if torch.__version__ < "2.13":
        torch._dynamo.reset()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_a_compiled_model_cast_after_quantizing_trains_as_the_cast_dequantized_model(architecture):
    from .tiny_models import tiny_peft_model

    model = tiny_peft_llama() if architecture == "llama" else tiny_peft_model(architecture)
    compiled = _compile(model)
    data = batch(16)
    compiled(**data).loss.backward()  # quantizes in float32
    model.zero_grad(set_to_none=True)
    model.to(torch.bfloat16)
    _forget_graphs_before_torch_2_13()
    reference = copy.deepcopy(model)  # dequantized in bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    loss = compiled(**data).loss  # recompiles for the new dtype
    loss.backward()
    ref_loss = reference(**data).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    want = _lora_grads(reference)
    for name, grad in _lora_grads(model).items():
        torch.testing.assert_close(grad, want[name], atol=1e-3, rtol=1e-2, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_quantized_on_the_gpu_moves_to_the_cpu_and_back():
    model = tiny_peft_llama().cuda()
    compiled = _compile(model)
    data = batch(16)
    on_gpu = {k: v.cuda() if torch.is_tensor(v) else v for k, v in data.items()}
    compiled(**on_gpu).loss.backward()
    with torch.no_grad():
        want = compiled(**on_gpu).logits.cpu()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model.cpu()
    _forget_graphs_before_torch_2_13()
    released = [p for p in model.parameters() if isinstance(p, ReleasedWeight)]
    assert len(released) == 14 and all(not p.is_cuda and not any(t.is_cuda for t in p._lowra_packed) for p in released)
    assert torch.cuda.memory_allocated() < before
    with torch.no_grad():
        torch.testing.assert_close(compiled(**data).logits, want, atol=1e-4, rtol=1e-4)  # recompiled on the CPU
    model.cuda()
    _forget_graphs_before_torch_2_13()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**on_gpu).logits.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_packed_base_loads_straight_onto_the_gpu_of_a_model_built_on_the_cpu(tmp_path):
    model = tiny_peft_llama()
    data = batch(8)
    _compile(model)(**data).loss.backward()
    path = tmp_path / "base.lowra.safetensors"
    lowra_compile.save_quantized(model, path)
    with torch.no_grad():
        want = model(**data).logits

    fresh = tiny_peft_llama()  # the same base and adapters' start, on the CPU
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    lowra_compile.load_quantized(fresh, path, device="cuda")
    released = [p for p in fresh.parameters() if isinstance(p, ReleasedWeight)]
    assert len(released) == 14 and all(p.is_cuda and all(t.is_cuda for t in p._lowra_packed) for p in released)
    fresh.to("cuda")  # the rest follows; the released weights are already there
    torch._dynamo.reset()
    with torch.no_grad():
        got = _compile(fresh)(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in data.items()}).logits
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "mode, want, warns",
    [
        ("max-autotune-no-cudagraphs", {"max_autotune": True, "coordinate_descent_tuning": True}, None),
        ("max-autotune", {"max_autotune": True, "coordinate_descent_tuning": True}, "CUDA graphs"),
        ("reduce-overhead", None, "CUDA graphs"),
    ],
)
def test_torch_compile_s_mode_reaches_inductor_without_cuda_graphs(mode, want, warns, monkeypatch):
    import torch._inductor.compile_fx as inductor

    patches = []
    compile_fx = inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx",
                        lambda gm, inputs, config_patches=None: patches.append(config_patches) or compile_fx(gm, inputs))
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).requires_grad_(False)
    compiled = torch.compile(model, backend="lowra", mode=mode)
    x = torch.randn(4, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = compiled(x)
    assert patches == [want]
    assert any(warns in str(w.message) for w in caught) if warns else not any("mode=" in str(w.message) for w in caught)
    assert isinstance(model[0].weight, ReleasedWeight)
    torch.testing.assert_close(y, model(x))  # the dequantized model, eagerly


def test_mode_as_an_option_goes_with_the_other_options(monkeypatch):
    import torch._inductor.compile_fx as inductor

    patches = []
    compile_fx = inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx",
                        lambda gm, inputs, config_patches=None: patches.append(config_patches) or compile_fx(gm, inputs))
    model = torch.nn.Linear(64, 64).requires_grad_(False)
    options = {"bits": 3.0, "progress": False, "mode": "max-autotune-no-cudagraphs"}
    torch.compile(model, backend="lowra", options=options)(torch.randn(4, 64))
    assert patches == [{"max_autotune": True, "coordinate_descent_tuning": True}]
    assert model.weight._lowra_weight.code_bits() == 3.0
    with pytest.raises(ValueError, match=r"mode='fastest' is not one of"):
        lowra_compile.LowRAConfig(mode="fastest")


def test_an_unknown_mode_raises():
    with pytest.raises(RuntimeError, match="Unrecognized mode"):
        torch.compile(torch.nn.Linear(8, 8).requires_grad_(False), backend="lowra", mode="fastest")(torch.randn(2, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_over_the_packed_ops_train_as_the_eager_model():
    # What would let mode="reduce-overhead" / "max-autotune" keep their CUDA graphs (mode_options drops them
    # until this passes on a GPU): Inductor's CUDA graph trees around the packed ops, forward and backward.
    import torch._inductor.config as inductor_config

    model = tiny_peft_llama().cuda()
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "inductor", "bits": 2.0})
    data = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch(16).items()}
    compiled(**data).loss.backward()  # quantizes (without CUDA graphs)
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    with inductor_config.patch({"triton.cudagraphs": True}):
        compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "inductor"})
        for seed in range(3):  # warm-up, recording, replay
            step = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch(16, seed=seed).items()}
            loss = compiled(**step).loss
            loss.backward()
            ref_loss = reference(**step).loss
            ref_loss.backward()
            torch.testing.assert_close(loss, ref_loss, atol=2e-4, rtol=2e-4)
    for name, grad in _lora_grads(model).items():
        torch.testing.assert_close(grad, dict(reference.named_parameters())[name].grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("stored_in_out", [False, True])
def test_lora_on_stacked_experts_gives_the_dequantized_stack_s_outputs_and_gradients(stored_in_out):
    """Both outputs (the grouped product, and PEFT's cached W + 2 * lhs @ rhs, rebuilt from the packed stack)
    and the factors' gradients through both, on the first call and on the recompile that reads the
    released weight."""
    model = ExpertsWithLora(stored_in_out)
    x, offsets = torch.randn(10, 64), torch.tensor([3, 3, 8, 10], dtype=torch.int32)
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})
    results = [compiled(x, offsets)]  # quantizes, releases W
    assert isinstance(model.weight, ReleasedWeight)
    reference = copy.deepcopy(model)  # the dequantized stack
    lowra_compile.codegen.clear_log()
    results.append(compiled(x, offsets))  # W's class changed: a recompile, which runs the grouped op too
    assert {e["op"] for e in lowra_compile.codegen.kernel_log()} == {"grouped_linear", "dequant"}  # dequant: the update
    want_y, want_update = reference(x, offsets)
    ((want_y**2).mean() + (want_update**2).mean()).backward()
    for y, update in results:
        model.zero_grad(set_to_none=True)
        ((y**2).mean() + (update**2).mean()).backward()
        torch.testing.assert_close(y, want_y, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(update, want_update)
        torch.testing.assert_close(model.lhs.grad, reference.lhs.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.rhs.grad, reference.rhs.grad, atol=1e-5, rtol=1e-5)


def test_a_cached_compile_is_found_again_only_with_the_same_ops_source(monkeypatch):
    # torch's compile caches key a graph on its nodes, not on the ops' autograd rule: a backward traced by an
    # older lowra (another lora_linear_backward signature) was found again after an upgrade and failed
    import uuid

    import lowra_compile.backend as backend

    model = tiny_peft_llama(layers=1)
    data = batch(8)

    def compile_and_step(digest: str) -> collections.Counter:
        monkeypatch.setattr(backend, "_OPS_DIGEST", digest)
        torch._dynamo.reset()
        counters.clear()
        _compile(model, inner="inductor")(**data).loss.backward()
        return collections.Counter(counters["aot_autograd"])

    source, upgraded = uuid.uuid4().hex, uuid.uuid4().hex  # keys no earlier run has cached
    compile_and_step(source)  # quantizes; the graph of the packed model is another one
    assert compile_and_step(source)["autograd_cache_miss"] >= 1
    assert compile_and_step(source)["autograd_cache_hit"] >= 1  # the packed model's graph again, from the cache
    again = compile_and_step(upgraded)
    assert again["autograd_cache_hit"] == 0 and again["autograd_cache_miss"] >= 1


def test_a_compiled_model_nobody_froze_is_told_so_and_one_with_a_frozen_body_is_not():
    # the frame's modules decide: a graph of trainable linears alone is a model nobody froze only if the model
    # around it has no frozen weight (a graph break can leave a trainable head alone in a graph)
    unfrozen = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"nothing in this graph is quantized: its 2 linear layer\(s\)"):
        _compile(unfrozen)(torch.randn(2, 16))
    torch._dynamo.reset()

    class BrokenBeforeHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = torch.nn.Linear(16, 16).requires_grad_(False), torch.nn.Linear(16, 4)

        def forward(self, x):
            h = self.body(x)
            torch._dynamo.graph_break()
            return self.head(h)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compile(BrokenBeforeHead(), calibrate="activation")(torch.randn(2, 16))
    assert not [w for w in caught if "nothing in this graph is quantized" in str(w.message)]


class _CountingNet(torch.nn.Module):
    """A frozen linear between two in-place updates of buffers: a call counter and BatchNorm's statistics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(64, 64).requires_grad_(False)
        self.bn = torch.nn.BatchNorm1d(64)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        return self.bn(self.lin(x))


@pytest.mark.parametrize("calibrate", ["fisher", "activation"])
def test_the_quantizing_call_updates_the_model_s_buffers_once(calibrate):
    # the calibration run is a call of the graph more than the user's: its in-place updates of the inputs
    # (transformers' StaticCache filled at its running position, as here a counter and BatchNorm's running
    # statistics) were made twice, and a static-cache generate whose prefill quantized failed or went wrong
    x, net = torch.randn(32, 64), _CountingNet()
    _compile(net, calibrate=calibrate)(x)
    assert packed_weight(net.lin.weight) is not None
    assert net.calls.item() == 1 and net.bn.num_batches_tracked.item() == 1
    once = torch.nn.BatchNorm1d(64)
    once(net.lin(x))  # one update, on the quantized layer's output
    torch.testing.assert_close(net.bn.running_mean, once.running_mean)
    torch.testing.assert_close(net.bn.running_var, once.running_var)
