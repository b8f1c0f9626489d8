import pytest
import torch
import torch.nn.functional as F

from lowra_compile.passes.match import match_sites

from ..tiny_models import batch, capture_graph, tiny_llama, tiny_peft_llama


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


def test_skip_patterns_and_plain_linears():
    gm, _ = capture_graph(tiny_llama().requires_grad_(False), **batch(8))
    names = [s.name for s in match_sites(gm, skip=("lm_head", "mlp"))]
    assert names and all("mlp" not in n and "lm_head" not in n for n in names)


def test_trainable_weights_are_not_sites():
    lin = torch.nn.Linear(16, 16)
    gm, _ = capture_graph(torch.nn.Sequential(lin), torch.randn(2, 16))
    assert match_sites(gm) == []


def test_scaling_as_symfloat_under_dynamic_shapes():
    model = tiny_peft_llama()
    captured = []

    def backend(gm, example_inputs, **_):
        captured.append(gm)
        return gm.forward

    torch.compile(model, backend=backend, dynamic=True)(**batch(8))
    sites = match_sites(captured[0], skip=("lm_head",))
    assert len(sites) == 14
    assert all(isinstance(s.lora.scaling, (float, torch.fx.Node)) for s in sites)

