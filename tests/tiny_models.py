"""Tiny randomly initialised Llama models, with and without PEFT LoRA adapters, and token batches."""

import torch

VOCAB = 128


def tiny_llama(layers: int = 2, hidden: int = 64, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def tiny_peft_llama(dropout: float = 0.0, seed: int = 0, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, **lora_kwargs)
    model = get_peft_model(tiny_llama(seed=seed), config)
    model.train()
    return model


def batch(length: int = 16, size: int = 2, seed: int = 0) -> dict:
    ids = torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def capture_graph(fn, *args, **kwargs):
    """The Dynamo graph and real example inputs that a backend would receive for `fn(*args, **kwargs)`."""
    captured = []

    def backend(gm, example_inputs, **_):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(fn, backend=backend)(*args, **kwargs)
    assert len(captured) == 1, "expected one graph"
    return captured[0]
