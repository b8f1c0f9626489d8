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


def test_falcon_s_x_at_w_t_runs_the_packed_op_after_a_recompile_too(monkeypatch):
    import lowra_compile.backend as backend

    graphs = []
    inner = backend._compile_inner
    monkeypatch.setattr(backend, "_compile_inner",
                        lambda gm, inputs, name: graphs.append(gm) or inner(gm, inputs, name))
    model = tiny_peft_model("falcon")
    compiled = torch.compile(model, backend="lowra", options={"bits": 2.0, "progress": False, "inner": "eager"})
    compiled(**batch(16)).loss.backward()
    with torch.no_grad():
        compiled(**batch(16))  # a recompile: the released weights' W.T reaches Dynamo as a dequantization
    # Falcon breaks into several graphs per call; each of its 8 linears is one packed op per call
    targets = [n.target for gm in graphs for n in gm.graph.nodes]
    assert targets.count(torch.ops.lowra.lora_linear.default) == 16
    assert torch.ops.lowra.dequant.default not in targets
