"""The backend on other decoder families than Llama: every LoRA-wrapped linear is found, packed, and trains
with the gradients of the same model on the dequantized weights."""

import copy

import pytest
import torch

from lowra_compile.passes.release import ReleasedWeight

from .tiny_models import ARCHITECTURES, batch, tiny_peft_model


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_lora_linear_is_packed_and_gradients_match_the_dequantized_model(architecture):
    model = tiny_peft_model(architecture)
    compiled = torch.compile(model, backend="lowra", options={"bits": 2.0, "progress": False, "inner": "eager"})
    data = batch(16)
    compiled(**data).loss.backward()  # the first call quantizes
    base = {n: p for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    assert base and all(isinstance(p, ReleasedWeight) for p in base.values()), architecture

    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)  # dense dequantized weights
    loss = compiled(**data).loss
    loss.backward()
    ref_loss = reference(**data).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and len(got) == 2 * len(base)  # LoRA A and B per layer, in both models
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


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
