"""The backend on other decoder families than Llama: every LoRA-wrapped linear is found, packed, and trains
with the gradients of the same model on the dequantized weights."""

import copy
import warnings

import pytest
import torch
from torch.nn.utils import parametrize

import lowra_compile
from lowra_compile import codegen
from lowra_compile.passes.release import ReleasedWeight

from .dequantized import assert_trains_as_dequantized
from .tiny_models import ARCHITECTURES, batch, tiny_llama, tiny_moe, tiny_moe_with_lora_on_the_experts, tiny_peft_model


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_lora_linear_is_packed_and_gradients_match_the_dequantized_model(architecture):
    model = tiny_peft_model(architecture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = assert_trains_as_dequantized(model, batch(16))
    # a layer is named as the model names it (BioGPT's tied output_projection came as "__dict__['_modules']...")
    assert not [w for w in caught if "lowra" in str(w.message) and "__dict__" in str(w.message)]
    base = {n: p for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    assert base and all(isinstance(p, ReleasedWeight) for p in base.values()), architecture
    assert len(got) == 2 * len(base)  # LoRA A and B per layer


# DoRA where the layers differ from Llama's: x @ W.T (Falcon), fused q/k/v (Phi-3, GPT-NeoX), biased q/k/v
# (Qwen2), weights stored (in, out) that PEFT's DoRA transposes (GPT-2's Conv1D); a one-off run of all 22
# families packed and matched too (docs/usage.md, "DoRA")
@pytest.mark.parametrize("architecture", ["falcon", "gpt2", "gpt_neox", "phi3", "qwen2"])
def test_every_dora_linear_is_packed_and_gradients_match_the_dequantized_model(architecture):
    model = tiny_peft_model(architecture, use_dora=True)
    got = assert_trains_as_dequantized(model, batch(16))
    base = {n: p for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    assert base and all(isinstance(p, ReleasedWeight) for p in base.values()), architecture
    assert len(got) == 3 * len(base)  # LoRA A and B and DoRA's magnitude per layer
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert len(lora_b) == len(base) and all(p.any() for p in lora_b)  # LoftQ started every adapter


def test_a_sequence_classifier_packs_its_decoder_and_trains_its_saved_head_as_the_dequantized_model():
    # PEFT's SEQ_CLS task keeps a trainable copy of the `score` head (modules_to_save): it stays dense and
    # trains; the decoder's LoRA-wrapped linears are packed; the loss is the classification loss.
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(tiny_llama(num_labels=3), lora).train()
    data = {"input_ids": batch(16, size=4)["input_ids"].clamp(min=1), "labels": torch.tensor([0, 1, 2, 1])}
    got = assert_trains_as_dequantized(model, data)
    assert len(lowra_compile.report(model).layers) == 14  # 7 linears in each of 2 layers
    assert len(got) == 2 * 6 + 1 and any("score" in n for n in got)  # LoRA A and B on 6 linears, the head


def test_a_vision_transformer_packs_its_encoder_and_warns_of_nothing_left_dense():
    # ViT's class token and position embeddings ([1, T, D] frozen parameters) were named in a warning that frozen
    # weights (taken for a mixture's stacked experts) stay dense
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    model = get_peft_model(transformers.ViTForImageClassification(config), LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear")).train()
    data = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = assert_trains_as_dequantized(model, data)
    assert not [str(w.message) for w in caught if "stay dense" in str(w.message)]
    assert len(lowra_compile.report(model).layers) == 12 and len(got) == 2 * 12 + 2  # 6 linears a layer; the head


@pytest.mark.parametrize("architecture", ["falcon", "gpt2"])
def test_products_run_the_packed_op_with_its_lora_after_a_recompile_too(architecture, monkeypatch):
    """Falcon's x @ W.T reaches a recompile as a dequantization, GPT-2's Conv1D as the packed op on the
    flattened input: both become the fused op again."""
    import lowra_compile.backend as backend

    graphs = []
    inner = backend._compile_inner
    monkeypatch.setattr(backend, "_compile_inner",
                        lambda gm, *args: graphs.append(gm) or inner(gm, *args))
    model = tiny_peft_model(architecture)
    compiled = torch.compile(model, backend="lowra", options={"bits": 2.0, "progress": False, "inner": "eager"})
    compiled(**batch(16)).loss.backward()
    first = len(graphs)
    with torch.no_grad():
        compiled(**batch(16))  # a recompile (grad mode changed) on the released weights
    # each model has 8 linears: one fused op per linear and call, with its LoRA branch
    for calls in (graphs[:first], graphs[first:]):
        ops = [n for gm in calls for n in gm.graph.nodes if n.target is torch.ops.lowra.lora_linear.default]
        assert len(ops) == 8 and all(n.args[5] is not None for n in ops)
    targets = [n.target for gm in graphs for n in gm.graph.nodes]
    assert torch.ops.lowra.dequant.default not in targets


def test_gpt2_s_packed_base_saves_loads_and_materializes_in_its_own_orientation(tmp_path):
    import lowra_compile

    model = tiny_peft_model("gpt2")
    compiled = torch.compile(model, backend="lowra", options={"bits": 2.0, "progress": False, "inner": "eager"})
    data = batch(16)
    compiled(**data).loss.backward()
    conv = model.get_base_model().transformer.h[0].mlp.c_fc.base_layer  # Conv1D(256, 64): weight (64, 256)
    assert isinstance(conv.weight, ReleasedWeight) and tuple(conv.weight.shape) == (64, 256)
    assert conv.weight._lowra_weight.shape == (256, 64)  # packed as the (out, in) matrix
    with torch.no_grad():
        want = compiled(**data).logits
    dense = model.state_dict()[next(n for n, p in model.named_parameters() if p is conv.weight)]
    x = torch.randn(3, 64)
    torch.testing.assert_close(conv(x), x @ dense + conv.bias, atol=1e-5, rtol=1e-5)  # eager call, packed op

    path = tmp_path / "base.lowra.safetensors"
    lowra_compile.save_quantized(model, path)
    fresh = tiny_peft_model("gpt2")
    fresh.load_state_dict({n: p for n, p in model.state_dict().items() if "lora_" in n}, strict=False)
    lowra_compile.load_quantized(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data).logits, want, atol=1e-5, rtol=1e-5)
    lowra_compile.materialize(fresh)
    fresh_conv = fresh.get_base_model().transformer.h[0].mlp.c_fc.base_layer
    assert type(fresh_conv.weight) is torch.nn.Parameter
    torch.testing.assert_close(fresh_conv.weight, dense)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_mixture_of_experts_packs_its_stacked_experts_and_trains_as_the_dequantized_model(family, tmp_path):
    # transformers 5 stacks a layer's experts in one tensor, [experts, out, in] (Mixtral) or [experts, in, out]
    # (gpt-oss), and runs them with a grouped product: each stack is packed as one [experts * out, in] matrix
    # and runs lowra's grouped op.
    model = tiny_moe(family)
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})
    data = batch(16)
    compiled(**data).loss.backward()
    experts = {n: p for n, p in model.named_parameters() if "experts" in n and p.dim() == 3}  # not biases
    assert len(experts) == 4 and all(isinstance(p, ReleasedWeight) for p in experts.values())
    rows = {r.name: r for r in lowra_compile.report(model).layers}
    [row] = [r for n, r in rows.items() if n.endswith("layers.0.mlp.experts.gate_up_proj")]
    assert row.shape == (4 * 256, 64) and any(k.startswith("grouped_linear:") for k in row.kernels)
    routers = [p for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight", "mlp.router.weight"))]
    assert len(routers) == 2 and not any(isinstance(p, ReleasedWeight) for p in routers)  # routers stay dense
    dense = lowra_compile.report(model).dense  # and the report says so, as for lm_head
    assert sum(n.endswith(("mlp.gate.weight", "mlp.router.weight")) for n in dense) == 2 and dense[-1].endswith("lm_head.weight")

    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)  # dense dequantized weights, transformers' own grouped product
    loss = compiled(**data).loss
    loss.backward()
    ref_loss = reference(**data).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)

    # A recompile (no_grad, another shape) reads the packed experts through the grouped op too.
    codegen.clear_log()
    other = batch(8, seed=1)
    with torch.no_grad():
        logits = compiled(input_ids=other["input_ids"]).logits
        torch.testing.assert_close(logits, reference(input_ids=other["input_ids"]).logits, atol=1e-5, rtol=1e-5)
    assert sum(r["calls"] for r in codegen.kernel_log() if r["op"] == "grouped_linear") == 4

    # Checkpoints keep the [experts, out, in] shape; the packed base loads back onto a fresh model.
    name = next(iter(experts))
    assert model.state_dict()[name].shape == experts[name].shape
    lowra_compile.save_quantized(model, tmp_path / "base.safetensors")
    fresh = tiny_moe(family)
    lowra_compile.load_quantized(fresh, tmp_path / "base.safetensors")
    assert isinstance(fresh.get_parameter(name), ReleasedWeight)
    torch.testing.assert_close(fresh.get_parameter(name).detach(), experts[name].detach())
    smaller = tiny_moe(family, intermediate_size=96)
    here = tuple(smaller.get_parameter(row.name).shape)
    with pytest.raises(ValueError, match=rf"experts.gate_up_proj' is \({', '.join(map(str, here))}\) here but packed as \(1024, 64\)"):
        lowra_compile.load_quantized(smaller, tmp_path / "base.safetensors")


def test_pack_routers_quantizes_a_mixtures_routers_too():
    model = tiny_moe("mixtral")
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager", "pack_routers": True})
    compiled(**batch(16)).loss.backward()
    routers = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(isinstance(p, ReleasedWeight) for p in routers)


def test_experts_run_another_way_than_a_grouped_product_stay_dense_and_say_how_to_pack_them():
    model = tiny_moe("mixtral", "batched_mm")  # selects each token's experts by indexing the stack
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})(**batch(16)).loss.backward()
    [message] = [str(w.message) for w in caught if "stay dense" in str(w.message)]
    assert "4 frozen weight(s)" in message and "experts.gate_up_proj" in message
    assert 'experts_implementation="grouped_mm"' in message
    packed = [n for n, p in model.named_parameters() if isinstance(p, ReleasedWeight)]
    assert len(packed) == 8 and not any("experts" in n for n in packed)  # 4 attention linears x 2 (routers: dense)
    # the report's dense weights list the stacks too (it had only the routers and the head)
    assert sum(".experts." in n for n in lowra_compile.report(model).dense) == 4


def test_experts_run_in_a_loop_outside_the_graphs_are_named_by_quantize_and_the_report():
    model = tiny_moe("mixtral", "eager")  # a loop over experts with graph breaks: lowra never sees the stacks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowra_compile.quantize_(model, batch(16), {"progress": False, "inner": "eager"})
    said = [str(w.message) for w in caught if "called in no compiled graph" in str(w.message)]
    assert len(said) == 1 and "4 frozen linear weight(s)" in said[0] and ".experts." in said[0], said
    assert sum(".experts." in n for n in lowra_compile.report(model).dense) == 4

def test_lora_on_the_experts_of_a_bf16_model_runs_beside_the_grouped_op():
    # in bf16 transformers runs torch._grouped_mm, which refused PEFT's factors: permuted views, and a rank of 4
    # is 8 bytes where it wants strides of 16
    model = tiny_moe_with_lora_on_the_experts("mixtral", dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})
    data = batch(16)
    compiled(**data).loss.backward()
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    codegen.clear_log()
    loss = compiled(**data).loss
    loss.backward()
    assert sum(r["calls"] for r in codegen.kernel_log() if r["op"] == "grouped_linear") == 4
    ref_loss = reference(**data).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-2)  # bf16: the adapter apart, not in W + B A
    grads = {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), reference.parameters()) if p.requires_grad}
    assert sum("experts" in n for n in grads) == 8 and all(got is not None for got, _ in grads.values())


def test_lora_on_the_experts_evaluated_after_training_still_runs_the_grouped_op():
    # each layer's experts compile again in each grad mode (PEFT's cached read is guarded per module): with
    # room for one compile per layer, evaluation hit Dynamo's recompile limit and dequantized every stack whole
    model = tiny_moe_with_lora_on_the_experts("mixtral")
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})
    compiled(**batch(16)).loss.backward()
    model.eval()
    for grad in (True, False):
        codegen.clear_log()
        with torch.set_grad_enabled(grad):
            compiled(input_ids=batch(16, seed=1)["input_ids"])
        assert sum(r["calls"] for r in codegen.kernel_log() if r["op"] == "grouped_linear") == 4, grad
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_lora_on_the_experts_themselves_packs_them_and_trains_as_the_dequantized_model(family):
    # PEFT's target_parameters reads each stack through a parametrization, W + s * lhs @ rhs per expert, and
    # caches that sum: lowra packs W and runs the adapter's factors beside the grouped op.
    model = tiny_moe_with_lora_on_the_experts(family)
    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})
    data = batch(16)
    compiled(**data).loss.backward()
    experts = {n: p for n, p in model.named_parameters() if "experts" in n and p.dim() == 3}
    assert len(experts) == 4 and all(isinstance(p, ReleasedWeight) for p in experts.values())
    rows = [r for r in lowra_compile.report(model).layers if "experts" in r.name]
    assert len(rows) == 4 and all(any(k.startswith("grouped_linear:") for k in r.kernels) for r in rows)

    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)  # dense dequantized weights, PEFT's own parametrization
    codegen.clear_log()
    loss = compiled(**data).loss  # PEFT registers its parametrization again, now on the released weights
    loss.backward()
    calls = {op: sum(r["calls"] for r in codegen.kernel_log() if r["op"] == op)
             for op in ("grouped_linear", "grouped_linear_backward")}
    assert calls == {"grouped_linear": 4, "grouped_linear_backward": 4}  # the recompile's graphs too
    ref_loss = reference(**data).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    grads = {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), reference.parameters()) if p.requires_grad}
    assert sum("experts" in n for n in grads) == 8  # A and B of two stacks in two layers
    for name, (got, want) in grads.items():
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
    other = batch(16, seed=1)  # other tokens, the same shapes and grad mode: nothing compiles again
    torch.testing.assert_close(compiled(**other).logits, reference(**other).logits, atol=1e-5, rtol=1e-5)
    assert all(p.untyped_storage().nbytes() == 0 for p in experts.values())  # nothing made them dense again

    # PEFT registers its parametrization anew on every forward: the experts keep one class all the same, so
    # their frame does not compile again and every step runs the grouped op (it ran eagerly from step 4)
    stacks = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    classes = {type(m) for m in stacks}
    for _ in range(3):
        codegen.clear_log()
        compiled(**data).loss.backward()
        assert sum(r["calls"] for r in codegen.kernel_log() if r["op"] == "grouped_linear_backward") == 4
    assert {type(m) for m in stacks} == classes and len(classes) == 1  # one class, shared by both layers
    assert not any("parametrizations" in k or "anchor" in k for k in model.state_dict())  # checkpoints as before

    merged, merged_reference = lowra_compile.merge(model), reference.merge_and_unload()  # adapters folded in
    with torch.no_grad():
        torch.testing.assert_close(merged(**other).logits, merged_reference(**other).logits,
                                   atol=1e-5, rtol=1e-5)
    assert not any(parametrize.is_parametrized(m) for m in stacks)  # their own class again


def test_quantize_ahead_gives_lora_on_the_experts_loss_gradients_across_peft_s_graph_breaks(planned_statistics):
    # PEFT's parametrization breaks the graph around each stack: compiled, each of the graphs gets no loss
    # gradient and plans on E[x^2] alone, on its own budget. quantize_ runs the whole model: every layer gets
    # its E[g^2], one plan covers them, and the compiled model trains as the dequantized one. With more layers
    # than Dynamo's recompile limit (the experts' frame compiles once per layer), every layer stays fused.
    model = tiny_moe_with_lora_on_the_experts("mixtral", layers=3)
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=2):
        warnings.filterwarnings("error", message=".*no loss gradient")
        lowra_compile.quantize_(model, [batch(16, seed=s) for s in range(2)], {"progress": False})
    [stats] = planned_statistics
    assert len(stats) == 18 and all(s.g2 is not None and s.tokens > 0 for s in stats)  # 6 in each of 3 layers
    experts = [p for n, p in model.named_parameters() if "experts" in n and p.dim() == 3]
    assert len(experts) == 6 and all(isinstance(p, ReleasedWeight) for p in experts)
    assert lowra_compile.report(model).code_bits == pytest.approx(2.0, abs=0.01)

    compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})
    reference = copy.deepcopy(model)
    for step in range(2):
        data = batch(16, seed=3 + step)
        codegen.clear_log()
        loss, ref_loss = compiled(**data).loss, reference(**data).loss
        loss.backward()
        ref_loss.backward()
        assert sum(r["calls"] for r in codegen.kernel_log() if r["op"] == "grouped_linear_backward") == 6, step
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
                p.grad, q.grad = None, None


def test_several_adapters_on_the_experts_keep_them_dense_and_say_what_to_change():
    from peft import LoraConfig

    model = tiny_moe(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                          target_parameters=["mlp.experts.gate_up_proj"]))
    model.base_model.set_adapter(["default", "other"])  # PEFT then adds both adapters' dense update to W
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})(**batch(16)).loss.backward()
    dense = [str(w.message) for w in caught if "stay dense" in str(w.message)]
    assert any("gate_up_proj" in m and "several active adapters" in m for m in dense), dense
    packed = [n for n, p in model.named_parameters() if isinstance(p, ReleasedWeight)]
    assert not any("gate_up_proj" in n for n in packed) and any("down_proj" in n for n in packed)


def test_a_graph_break_before_the_saved_head_gives_no_warning_that_nobody_froze_the_model():
    # the break leaves the trainable `score` copy (modules_to_save) in a graph of its own, with no frozen
    # weight beside it: that graph is a fragment of a frozen model, not a model nobody froze
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(num_labels=3), lora).train()
    score = model.base_model.model.score
    score.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    data = {"input_ids": batch(16, size=4)["input_ids"].clamp(min=1), "labels": torch.tensor([0, 1, 2, 1])}
    compiled = torch.compile(model, backend="lowra", options={"bits": 2.0, "progress": False, "inner": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(**data).loss.backward()
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "nothing in this graph is quantized" in m], said
    assert len(lowra_compile.report(model).layers) == 14  # 7 linears in each of 2 layers
