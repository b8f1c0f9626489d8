import copy

import torch
from torch.nn.utils import parametrize

from lowra_compile.experts_class import ANCHOR, hold_class, hold_peft_experts, release_class

from .tiny_models import batch, tiny_moe_with_lora_on_the_experts


def _experts(model) -> list[torch.nn.Module]:
    return [layer.mlp.experts.get_base_layer() for layer in model.base_model.model.model.layers]


def test_held_experts_keep_one_class_through_peft_s_forwards_and_checkpoint_as_before():
    model = tiny_moe_with_lora_on_the_experts(layers=3)
    data = batch(16)
    with torch.no_grad():
        before = model(**data).logits
    assert not any(parametrize.is_parametrized(m) for m in _experts(model))  # PEFT removed its own
    keys = list(model.state_dict())

    experts = _experts(model)
    hold_peft_experts(model.modules())
    held_ones = [m for m in model.modules() if parametrize.is_parametrized(m, ANCHOR)]
    assert {id(m) for m in held_ones} == {id(m) for m in experts}  # those under PEFT's ParamWrappers, no other
    [held] = {type(m) for m in experts}  # one class, shared by every layer
    assert held.__bases__[0].__name__ == "MixtralExperts"
    loss = model(**data).loss
    loss.backward()  # PEFT registers its parametrization and removes it again
    assert {type(m) for m in _experts(model)} == {held}
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, before)  # the anchor changes no value
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n and "lora_" in n)
    assert list(model.state_dict()) == keys  # no key of the anchor in a checkpoint

    replica = copy.deepcopy(model)  # the reference models of the tests are deep copies
    with torch.no_grad():
        torch.testing.assert_close(replica(**data).logits, before)
    assert {type(m) for m in _experts(replica)} == {held}

    release_class(model)
    assert {type(m).__name__ for m in _experts(model)} == {"MixtralExperts"}
    assert not any(parametrize.is_parametrized(m) for m in _experts(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, before)
    assert list(model.state_dict()) == keys


def test_holding_leaves_room_in_the_recompile_limit_for_a_compile_per_layer():
    # PEFT reads the stack under parametrize.cached(), keyed by id(module): Dynamo compiles the experts' frame
    # once per layer, which a model of more layers than the limit would have run eagerly past it
    with torch._dynamo.config.patch(recompile_limit=2):
        hold_peft_experts(tiny_moe_with_lora_on_the_experts(layers=3).modules())
        assert torch._dynamo.config.recompile_limit >= 3 + 8  # a compile per layer, and the default's room
    with torch._dynamo.config.patch(recompile_limit=100):
        hold_peft_experts(tiny_moe_with_lora_on_the_experts(layers=3).modules())
        assert torch._dynamo.config.recompile_limit == 100  # never lowered


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_held_modules_of_one_class_share_one_unless_they_have_parametrizations_of_their_own():
    plain, other, scaled = (torch.nn.Linear(4, 3) for _ in range(3))
    parametrize.register_parametrization(scaled, "weight", _Double())  # the user's own, on `weight`
    x = torch.randn(2, 4)
    want = [m(x) for m in (plain, other, scaled)]
    for m in (plain, other, scaled):
        hold_class(m)
        hold_class(m)  # idempotent
    assert type(plain) is type(other) and type(scaled) is not type(plain)
    assert not parametrize.is_parametrized(plain, "weight")  # no other module's property shadows its weight
    for m, y in zip((plain, other, scaled), want):
        torch.testing.assert_close(m(x), y)
        assert set(m.state_dict()) <= {"weight", "bias", "parametrizations.weight.original"}

    release_class(torch.nn.Sequential(plain, other, scaled))
    assert type(plain) is torch.nn.Linear and type(other) is torch.nn.Linear
    assert parametrize.is_parametrized(scaled, "weight") and not parametrize.is_parametrized(scaled, ANCHOR)
    for m, y in zip((plain, other, scaled), want):
        torch.testing.assert_close(m(x), y)


def test_a_model_with_held_experts_pickles_whole_as_its_own_classes(tmp_path):
    # torch.save(model) refused a held module ("Serialization of parametrized modules is only supported
    # through state_dict()"), and parametrize's class is nobody's to import: it pickles as its own class,
    # without the anchor, which the next compile gives it again
    model = tiny_moe_with_lora_on_the_experts()
    data = batch(16)
    with torch.no_grad():
        before = model(**data).logits
    hold_peft_experts(model.modules())
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert {type(m).__name__ for m in _experts(loaded)} == {"MixtralExperts"}
    assert not any(parametrize.is_parametrized(m) for m in _experts(loaded))
    assert all(parametrize.is_parametrized(m, ANCHOR) for m in _experts(model))  # the model itself keeps it
    with torch.no_grad():
        torch.testing.assert_close(loaded(**data).logits, before)
    loaded(**data).loss.backward()  # PEFT parametrizes it on the forward, as on a model never held
    assert list(loaded.state_dict()) == list(model.state_dict())
