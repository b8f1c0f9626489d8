"""PEFT's LoRA options under the backend: each variant of the adapters (biases, per-layer ranks and scalings,
initialisation, dropout, trainable heads and embeddings) packs the base linears and trains with the loss and
gradients of the same model on the dequantized weights."""

import pytest
import torch

from lowra_compile.passes.release import ReleasedWeight

from .dequantized import assert_trains_as_dequantized
from .tiny_models import batch, tiny_llama, tiny_peft_model

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# LoraConfig options, and the trainable tensors each adds to LoRA's A and B on the 14 linears
VARIANTS = {
    "lora_bias": ({"lora_bias": True}, 14),  # a bias on each B
    "rank_pattern": ({"rank_pattern": {"q_proj": 8, "down_proj": 2}, "alpha_pattern": {"v_proj": 32}}, 0),
    "layers_to_transform": ({"layers_to_transform": [1]}, -14),  # layer 0 keeps no adapters
    # the adapters start at W's principal part, the base is the residual: lowra packs the residual and keeps
    # the adapters (LoftQ only starts adapters whose B is zero)
    "pissa_init": ({"init_lora_weights": "pissa"}, 0),
    "dropout": ({"lora_dropout": 0.1}, 0),
    "lm_head_saved": ({"modules_to_save": ["lm_head"]}, 1),  # a trainable copy of the head, dense
    "embeddings_adapted": ({"target_modules": [*LINEARS, "embed_tokens"]}, 2),  # LoRA on the (dense) embedding
    "new_token_rows": ({"trainable_token_indices": [3, 5]}, 1),  # trainable rows of the embedding
    # a magnitude per layer; the norm of W + s B A reads the packed W, and LoftQ starts the adapters
    "dora": ({"use_dora": True}, 14),
    "dora_dropout": ({"use_dora": True, "lora_dropout": 0.1}, 14),  # the base runs again on the dropped-out input
}


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_biases_of_packed_layers_get_the_gradients_of_the_dequantized_model(bias):
    # PEFT's bias option unfreezes the base layers' biases: the packed op takes them as its bias input
    model = tiny_peft_model("qwen2", bias=bias)  # q/k/v carry biases
    got = assert_trains_as_dequantized(model, batch(16))
    assert sum(n.endswith(".base_layer.bias") for n in got) == 6 and len(got) == 2 * 14 + 6


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_lora_variant_packs_the_base_and_trains_as_the_dequantized_model(variant):
    from peft import LoraConfig, get_peft_model

    options, extra = VARIANTS[variant]
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LINEARS, **options})
    model = get_peft_model(tiny_llama(), config).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n and n.endswith("weight")}
    got = assert_trains_as_dequantized(model, batch(16))
    kept = [torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start]
    assert all(kept) if variant == "pissa_init" else not any(kept)  # LoftQ started every zero B
    base = [p for n, p in model.named_parameters() if n.endswith("base_layer.weight") and "embed_tokens" not in n]
    assert len(base) == 14 if variant != "layers_to_transform" else 7
    packed = [n for n, p in model.named_parameters() if isinstance(p, ReleasedWeight)]
    assert len(packed) == 14  # adapted or not, every decoder linear is packed
    assert len(got) == 2 * 14 + extra


def test_an_adapter_prepared_for_compiled_hotswap_is_started_by_loftq_and_trains_as_the_dequantized_model():
    # PEFT's compiled hotswap keeps each scaling as a tensor (and pads the ranks): LoftQ must read it there
    from peft import LoraConfig, get_peft_model
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS)).train()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert_trains_as_dequantized(model, batch(16))
    assert all(p.any() for n, p in model.named_parameters() if ".lora_B." in n)  # LoftQ started them
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14


def test_a_lorafa_adapter_with_a_frozen_a_is_fused_and_loftq_leaves_it_alone():
    # PEFT's LoRA-FA (create_lorafa_optimizer) freezes A and trains B alone: the adapter is still fused into the
    # packed op (its backward gives B's gradient only), and LoftQ, which would have to move the frozen A, leaves
    # it as it is: B starts at zero, A at PEFT's draw
    from peft import LoraConfig, get_peft_model

    import lowra_compile

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS)).train()
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    lowra_compile.codegen.clear_log()
    got = assert_trains_as_dequantized(model, batch(16))
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    assert len(got) == 14 and all(".lora_B." in n for n in got)
    fused = [e for e in lowra_compile.codegen.kernel_log() if e["op"] == "lora_linear" and e["rank"] == 4]
    assert sum(e["calls"] for e in fused) == 2 * 14  # both steps ran every adapted layer through the fused op


# PEFT's other methods on the linears: each keeps the base layer's linear, which is packed, and runs its adapter
# as ordinary ops beside the packed op (a scaled input, a rotation, a spectral update, ...)
OTHER_METHODS = {
    "adalora": lambda peft: peft.AdaLoraConfig(r=4, init_r=4, target_r=2, total_step=10, target_modules=LINEARS),
    "vera": lambda peft: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]),
    "ia3": lambda peft: peft.IA3Config(target_modules=LINEARS, feedforward_modules=["down_proj"]),
    "oft": lambda peft: peft.OFTConfig(r=0, oft_block_size=8, target_modules=LINEARS),
    "boft": lambda peft: peft.BOFTConfig(boft_block_size=8, target_modules=LINEARS),
    "fourierft": lambda peft: peft.FourierFTConfig(n_frequency=16, target_modules=LINEARS),
}


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_another_peft_method_packs_every_base_linear_and_trains_as_the_dequantized_model(method):
    import peft

    model = peft.get_peft_model(tiny_llama(), OTHER_METHODS[method](peft)).train()
    with torch.no_grad():  # away from each method's start at the identity, so that every adapter changes the output
        for p in model.parameters():
            if p.requires_grad and p.dim() > 0:
                p.add_(0.01 * torch.randn_like(p))
    assert assert_trains_as_dequantized(model, batch(16))
    assert sum(isinstance(p, ReleasedWeight) for p in model.parameters()) == 14
