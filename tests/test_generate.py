"""Generation after fine-tuning: `model.generate` on the packed base gives the dequantized model's tokens."""

import copy

import pytest
import torch

import lowra_compile

from .tiny_models import batch, tiny_llama, tiny_peft_llama


@pytest.mark.parametrize("compiled,dora", [(False, False), (True, False), (True, True)])
def test_greedy_generation_on_the_packed_base_matches_the_dequantized_model(compiled, dora):
    model = tiny_peft_llama(use_dora=dora)
    options = {"progress": False, "inner": "eager", "bits": 2.0}
    if compiled:  # the Trainer's way (README): nn.Module.compile, one training step
        model.compile(backend="lowra", options=options)
        model(**batch(16)).loss.backward()
    else:
        lowra_compile.quantize_(model, batch(16), options)
    assert lowra_compile.report(model).layers  # packed
    reference = copy.deepcopy(model)
    lowra_compile.materialize(reference)
    model.eval(), reference.eval()
    prompt = batch(16, seed=1)["input_ids"][:2, :8]
    lowra_compile.codegen.clear_log()
    with torch.no_grad():
        tokens = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        # every step ran the packed op, the one-token steps included (no dense weight was rebuilt)
        assert {e["M"] for e in lowra_compile.codegen.kernel_log() if e["op"] == "lora_linear"} >= {2, 16}
        expected = reference.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, 14)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_a_static_cache_generate_that_quantizes_on_its_prefill_matches_the_dequantized_model():
    # the quantizing call's calibration run wrote the prompt's keys and values into the cache too, and the real
    # run then wrote them again at the next positions: attention saw the prompt twice (or, with no room to
    # spare, index_copy_ went out of bounds)
    from transformers import StaticCache

    model = tiny_llama().eval().requires_grad_(False)  # a frozen model, compiled to decode
    model.forward = torch.compile(model.forward, backend="lowra", options={"progress": False, "inner": "eager"})
    prompt = batch(16, seed=1)["input_ids"][:2, :8]

    def generate(m):
        cache = StaticCache(config=m.config, max_cache_len=32)
        return m.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, past_key_values=cache)

    with torch.no_grad():
        tokens = generate(model)  # the prefill quantizes
    assert lowra_compile.report(model).layers
    reference = copy.deepcopy(model)
    lowra_compile.materialize(reference)
    with torch.no_grad():
        torch.testing.assert_close(tokens, generate(reference), rtol=0, atol=0)
    torch._dynamo.reset()
