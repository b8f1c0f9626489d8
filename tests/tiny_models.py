"""Tiny randomly initialised Llama models (and other causal LMs), with and without PEFT LoRA adapters, and
token batches."""

import torch

VOCAB = 128


def tiny_llama(layers: int = 2, hidden: int = 64, seed: int = 0, tie: bool = False, num_labels: int | None = None):
    """A causal LM, or with `num_labels` a sequence classifier (padding token 0) on the same decoder."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    head = {} if num_labels is None else {"num_labels": num_labels, "pad_token_id": 0}
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, **head,
    )
    return (LlamaForCausalLM if num_labels is None else LlamaForSequenceClassification)(config)


def tiny_peft_llama(dropout: float = 0.0, seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32,
                    **lora_kwargs):
    """PEFT LoRA on every linear of `tiny_llama`, built in `dtype` (PEFT keeps the adapters in float32)."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, **lora_kwargs)
    model = get_peft_model(tiny_llama(layers=layers, seed=seed).to(dtype), config)
    model.train()
    return model


# Other decoder families: config class, its size fields, and the LoRA target modules of their linears.
_GQA = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
_ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", _GQA, _ATTENTION_MLP),  # biased q/k/v
    "qwen3": ("Qwen3Config", {**_GQA, "head_dim": 16}, _ATTENTION_MLP),
    "mistral": ("MistralConfig", _GQA, _ATTENTION_MLP),
    "gemma": ("GemmaConfig", {**_GQA, "head_dim": 16}, _ATTENTION_MLP),  # tied lm_head
    "gemma2": ("Gemma2Config", {**_GQA, "head_dim": 16}, _ATTENTION_MLP),
    "phi3": ("Phi3Config", {**_GQA, "num_key_value_heads": 4}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4, "word_embed_proj_dim": 64,
                          "dropout": 0.0}, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "falcon": ("FalconConfig", {"hidden_size": 64, "num_attention_heads": 4},  # x @ W.T, not F.linear
               ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "gpt2": ("GPT2Config", {"hidden_size": 64, "num_attention_heads": 4, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                            "resid_pdrop": 0.0}, ["c_attn", "c_proj", "c_fc"]),  # Conv1D: addmm on (in, out)
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
                 ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "gemma3_text": ("Gemma3TextConfig", {**_GQA, "head_dim": 16}, _ATTENTION_MLP),
    "olmo2": ("Olmo2Config", _GQA, _ATTENTION_MLP),  # q/k norms over the whole projection
    "cohere": ("CohereConfig", _GQA, _ATTENTION_MLP),  # parallel attention and MLP
    "starcoder2": ("Starcoder2Config", {**_GQA, "residual_dropout": 0.0},
                   ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]),
    "phi": ("PhiConfig", {**_GQA, "resid_pdrop": 0.0, "embd_pdrop": 0.0},  # partial rotary, fc1/fc2
            ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]),
    "gptj": ("GPTJConfig", {"n_embd": 64, "n_head": 4, "rotary_dim": 8, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                            "attn_pdrop": 0.0}, ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]),
    "bloom": ("BloomConfig", {"hidden_size": 64, "n_head": 4},  # ALiBi
              ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "mpt": ("MptConfig", {"d_model": 64, "n_heads": 4}, ["Wqkv", "out_proj", "up_proj", "down_proj"]),
    "gpt_bigcode": ("GPTBigCodeConfig", {"n_embd": 64, "n_head": 4, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                                         "resid_pdrop": 0.0}, ["c_attn", "c_proj", "c_fc"]),  # multi-query
    "biogpt": ("BioGptConfig", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                "activation_dropout": 0.0}, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    # a 1-output linear (the shared expert's gate) beside the routed experts, which stay without adapters
    "qwen2_moe": ("Qwen2MoeConfig", {**_GQA, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                                     "num_experts": 4, "num_experts_per_tok": 2},
                  [*_ATTENTION_MLP, "shared_expert_gate"]),
    # multi-head latent attention (kv_b_proj has 16 inputs, a quarter of a scale group); the MLPs, shared and
    # routed experts are packed without adapters (given the MLP's names, PEFT 0.21 wraps the routed experts'
    # parameters instead of the dense and shared MLPs)
    "deepseek_v3": ("DeepseekV3Config", {**_GQA, "num_key_value_heads": 4, "moe_intermediate_size": 32,
                                         "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                                         "n_group": 1, "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 16,
                                         "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16},
                    ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
}


def tiny_peft_model(architecture: str, seed: int = 0, **lora_kwargs):
    """A 2-layer model of `architecture` (a key of ARCHITECTURES) with LoRA on every decoder linear (more
    LoraConfig options in `lora_kwargs`)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config_class, sizes, targets = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **sizes,
    )
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora_kwargs)
    base = transformers.AutoModelForCausalLM.from_config(config)
    # GPT2LMHeadModel's name maps to no loss type: its first loss logs a warning, and that breaks the graph
    # before the loss (what a user of GPT-2 sets too: docs/usage.md, "GPT-2")
    base.loss_type = "ForCausalLM"
    model = get_peft_model(base, lora)
    model.train()
    return model


def batch(length: int = 16, size: int = 2, seed: int = 0) -> dict:
    ids = torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def tiny_moe(family: str = "mixtral", experts_implementation: str | None = None, intermediate_size: int = 128,
              layers: int = 2, dtype: torch.dtype = torch.float32, **lora):
    """A mixture of 4 experts stacked in one tensor (transformers 5), PEFT's LoRA on attention (or `lora`)."""
    import pytest
    import transformers
    from peft import LoraConfig, get_peft_model

    config_class = {"mixtral": transformers.MixtralConfig, "gpt_oss": transformers.GptOssConfig}[family]
    config = config_class(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=layers, head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        **({"experts_implementation": experts_implementation} if experts_implementation else {}),
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    if not any(p.dim() == 3 for p in base.parameters()):
        pytest.skip("this transformers keeps one nn.Linear per expert (those are packed like any other)")
    lora = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **lora}
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **lora))


def tiny_moe_with_lora_on_the_experts(family: str = "mixtral", layers: int = 2, dtype: torch.dtype = torch.float32):
    """PEFT's LoRA on the stacked experts themselves (target_parameters), and on q_proj."""
    model = tiny_moe(family, layers=layers, dtype=dtype, target_modules=["q_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with torch.no_grad():  # B starts at zero: give the experts' adapters a part in the output and the gradients
        for name, p in model.named_parameters():
            if "experts" in name and "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def capture_graph(fn, *args, **kwargs):
    """The Dynamo graph and real example inputs that a backend would receive for `fn(*args, **kwargs)`."""
    captured = []

    def backend(gm, example_inputs, **_):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(fn, backend=backend)(*args, **kwargs)
    assert len(captured) == 1, "expected one graph"
    return captured[0]


class StackedExperts(torch.nn.Module):
    """A mixture's experts as transformers 5 runs them: rows sorted by expert, one grouped product with the
    frozen [E, N, K] stack (transformers' own op for it), then a loss through a trainable head."""

    def __init__(self, experts: int = 4, n: int = 12, k: int = 64):
        super().__init__()
        import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(experts, n, k) / k**0.5, requires_grad=False)
        self.head = torch.nn.Parameter(torch.randn(n))

    def forward(self, x, offsets, target=None):
        y = torch.ops.transformers.grouped_mm_fallback(x, self.weight.transpose(-2, -1), offs=offsets) * self.head
        return ((y - target) ** 2).mean() if target is not None else y


class ExpertsWithLora(torch.nn.Module):
    """A mixture's frozen experts read as PEFT's `target_parameters` reads them: W + 2 * lhs @ rhs per expert,
    stored (E, N, K) and read transposed, or stored (E, K, N) (gpt-oss) and read as they are; the sum is
    also returned, as PEFT's parametrization cache makes it a graph output."""

    def __init__(self, stored_in_out: bool, experts: int = 4, n: int = 12, k: int = 64, r: int = 2):
        super().__init__()
        import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

        torch.manual_seed(0)
        self.stored_in_out = stored_in_out
        shape = (experts, k, n) if stored_in_out else (experts, n, k)
        self.weight = torch.nn.Parameter(torch.randn(shape), requires_grad=False)
        self.lhs = torch.nn.Parameter(torch.randn(shape[0], shape[1], r))
        self.rhs = torch.nn.Parameter(torch.randn(shape[0], r, shape[2]))

    def forward(self, x, offsets):
        update = torch.baddbmm(self.weight, self.lhs, self.rhs, alpha=2.0)
        read = update if self.stored_in_out else update.transpose(-2, -1)
        return torch.ops.transformers.grouped_mm_fallback(x, read, offs=offsets), update
