"""`save_quantized` / `load_quantized` round trip, and what they and `merge` cannot take: each error names the
layer or the step to take first."""

import pytest
import torch
from safetensors.torch import save_file

import lowra_compile
from lowra_compile.passes.release import ReleasedWeight


def _frozen_mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).requires_grad_(False)


def _quantized_mlp() -> torch.nn.Sequential:
    options = {"bits": 2.0, "calibrate": "activation", "progress": False}
    return lowra_compile.quantize_(_frozen_mlp(), {"input": torch.randn(32, 64)}, options)


def test_a_saved_base_loads_into_a_fresh_model_as_it_was(tmp_path):
    model, x = _quantized_mlp(), torch.randn(4, 64)
    assert lowra_compile.save_quantized(model, tmp_path / "base.safetensors") == 2
    fresh = lowra_compile.load_quantized(_frozen_mlp(seed=1), tmp_path / "base.safetensors")
    assert all(isinstance(fresh[i].weight, ReleasedWeight) for i in (0, 2))
    for i in (0, 2):
        fresh[i].bias.copy_(model[i].bias)  # biases are the model's, not the file's
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_packed_model_moves_to_meta_and_back_through_to_empty_and_load_quantized(tmp_path, monkeypatch):
    model, x = _quantized_mlp(), torch.randn(4, 64)
    expected, biases = model(x), [model[i].bias.clone() for i in (0, 2)]
    lowra_compile.save_quantized(model, tmp_path / "base.safetensors")
    dequantized = []
    monkeypatch.setattr(torch.ops.lowra, "dequant", lambda *a: dequantized.append(a) or torch.zeros(0))
    model.to("meta")  # no values to dequantize there: the packed form moves, as for any other device
    assert dequantized == [] and all(p.is_meta for p in model.parameters())
    assert all(isinstance(model[i].weight, ReleasedWeight) and model[i].weight._lowra_packed[0].is_meta for i in (0, 2))
    monkeypatch.undo()
    model.to_empty(device="cpu")  # the skeleton's way back: uninitialised dense weights, then the files
    lowra_compile.load_quantized(model, tmp_path / "base.safetensors")
    with torch.no_grad():
        for i, bias in zip((0, 2), biases):
            model[i].bias.copy_(bias)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_the_meta_and_back_recipe_of_the_usage_docs_restores_a_rope_models_outputs(tmp_path):
    # load_state_dict brings back the buffers a state dict holds; RoPE's inv_freq is in none, so the recipe in
    # docs/usage.md ("The meta device and to_empty") keeps every buffer across the move (without it the logits
    # differed, silently)
    from .tiny_models import batch, tiny_peft_llama

    data = batch(16)
    model = lowra_compile.quantize_(tiny_peft_llama(), data, {"bits": 2.0, "progress": False})
    with torch.no_grad():
        expected = model(**data).logits
    lowra_compile.save_quantized(model, tmp_path / "base.safetensors")
    rest = {k: v for k, v in model.state_dict().items() if "base_layer.weight" not in k}  # what the file lacks
    kept = {n: b.clone() for n, b in model.named_buffers()}
    model.to("meta")
    model.to_empty(device="cpu")
    lowra_compile.load_quantized(model, tmp_path / "base.safetensors")
    model.load_state_dict(rest, strict=False)
    with torch.no_grad():
        for n, b in kept.items():
            model.get_buffer(n).copy_(b)
        torch.testing.assert_close(model(**data).logits, expected, rtol=0, atol=0)


def test_a_base_loaded_into_a_cast_model_dequantizes_to_its_dtype(tmp_path):
    model = _quantized_mlp()
    lowra_compile.save_quantized(model, tmp_path / "base.safetensors")
    fresh = lowra_compile.load_quantized(_frozen_mlp().to(torch.float16), tmp_path / "base.safetensors")
    assert all(t.dtype == torch.float16 for t in fresh.state_dict().values())
    torch.testing.assert_close(fresh[0].weight.float(), model.to(torch.float16)[0].weight.float(), rtol=0, atol=0)


def test_a_file_of_something_else_is_refused_naming_it(tmp_path):
    save_file({"lora_A.weight": torch.zeros(4, 64)}, tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match=r"adapter.safetensors holds no packed weights"):
        lowra_compile.load_quantized(_frozen_mlp(), tmp_path / "adapter.safetensors")


def test_a_file_that_is_not_safetensors_is_refused_naming_it(tmp_path):
    torch.save(_frozen_mlp().state_dict(), tmp_path / "model.pt")  # safetensors said only "header too large"
    with pytest.raises(ValueError, match=r"model.pt is not a safetensors file written by save_quantized"):
        lowra_compile.load_quantized(_frozen_mlp(), tmp_path / "model.pt")


def test_a_base_loaded_under_inference_mode_trains_and_quantizing_there_is_refused(tmp_path):
    lowra_compile.save_quantized(_quantized_mlp(), tmp_path / "base.safetensors")
    with torch.inference_mode():
        fresh = lowra_compile.load_quantized(_frozen_mlp(), tmp_path / "base.safetensors")
        with pytest.raises(ValueError, match=r"quantize_ cannot run under torch.inference_mode\(\)"):
            _quantized_mlp()
    x = torch.randn(4, 64, requires_grad=True)
    fresh(x).sum().backward()  # the packed tensors are saved for the backward: no inference tensors
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_saving_a_model_without_packed_weights_says_to_quantize_first(tmp_path):
    with pytest.raises(ValueError, match=r"no packed weights; run one compiled step \(or quantize_\) first"):
        lowra_compile.save_quantized(_frozen_mlp(), tmp_path / "base.safetensors")


def test_loading_into_another_architecture_names_the_layer(tmp_path):
    lowra_compile.save_quantized(_quantized_mlp(), tmp_path / "base.safetensors")
    shorter = torch.nn.Sequential(torch.nn.Linear(64, 64)).requires_grad_(False)
    before = shorter[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"holds layer '2.weight', which this model does not have .* architecture it was saved"):
        lowra_compile.load_quantized(shorter, tmp_path / "base.safetensors")
    # every layer is checked before any is loaded: the model is left as it was, not half packed
    assert not isinstance(shorter[0].weight, ReleasedWeight) and torch.equal(shorter[0].weight, before)
    wider = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    with pytest.raises(ValueError, match=r"layer '0.weight' is \(128, 64\) here but packed as \(64, 64\)"):
        lowra_compile.load_quantized(wider, tmp_path / "base.safetensors")


def test_merge_of_a_model_without_adapters_points_to_materialize():
    model = _quantized_mlp()
    with pytest.raises(ValueError, match=r"merge needs a PEFT model .* use materialize\(\) instead"):
        lowra_compile.merge(model)
    assert isinstance(model[0].weight, ReleasedWeight)  # left packed


@pytest.mark.parametrize("damage", ["a tensor missing", "perm a row short", "perm not a permutation"])
def test_a_damaged_file_is_refused_naming_the_layer_before_any_layer_is_loaded(tmp_path, damage):
    # the second layer is damaged: before, the first was packed already, and a wrong-sized or scrambled perm
    # loaded without a word, to fail in the first forward with an index error that named nothing
    from safetensors import safe_open

    lowra_compile.save_quantized(_quantized_mlp(), tmp_path / "base.safetensors")
    with safe_open(str(tmp_path / "base.safetensors"), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    if damage == "a tensor missing":
        del tensors["2.weight::5"]
    elif damage == "perm a row short":
        tensors["2.weight::0"] = tensors["2.weight::0"][:-1].clone()
    else:
        tensors["2.weight::0"][0] = tensors["2.weight::0"][1]
    save_file(tensors, str(tmp_path / "damaged.safetensors"), metadata=metadata)
    model = _frozen_mlp()
    with pytest.raises(ValueError, match=r"damaged.safetensors is damaged: .*layer '2.weight'"):
        lowra_compile.load_quantized(model, tmp_path / "damaged.safetensors")
    assert not any(isinstance(p, ReleasedWeight) for p in model.parameters())


def test_peft_adapters_saved_from_the_trainable_tensors_match_the_full_save_without_dequantizing(tmp_path, monkeypatch):
    # docs/usage.md ("Saving the adapters alone"): PEFT's save_pretrained builds the whole state dict, every
    # packed weight dequantized into host memory; given the trainable tensors it writes the same adapter file and
    # dequantizes none
    from safetensors.torch import load_file

    from lowra_compile.passes import release

    from .tiny_models import batch, tiny_peft_llama

    model = lowra_compile.quantize_(tiny_peft_llama(), batch(16), {"bits": 2.0, "progress": False})
    model.save_pretrained(tmp_path / "full")
    dequantized = []
    monkeypatch.setattr(release, "dequantized", lambda p: dequantized.append(p) or pytest.fail("dequantized"))
    model.save_pretrained(tmp_path / "light",
                          state_dict={n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    assert not dequantized
    full, light = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("full", "light"))
    assert full.keys() == light.keys() and len(full) == 2 * 14
    assert all(torch.equal(full[k], light[k]) for k in full) and any(full[k].any() for k in full if "lora_B" in k)


def test_quantizing_weights_dequantized_from_a_packed_base_warns_and_points_to_load_quantized():
    # resuming through model.state_dict() -> load_state_dict into a fresh model, then compiling, quantized the
    # dequantized base again: another base than the adapters trained on, silently
    from .tiny_models import batch, tiny_peft_llama

    options = {"bits": 2.0, "progress": False}
    saved = lowra_compile.quantize_(tiny_peft_llama(), batch(16), options).state_dict()
    fresh = tiny_peft_llama(seed=1)
    with pytest.warns(UserWarning) as caught:
        lowra_compile.quantize_(fresh, batch(16), options)
    assert not any("hold at most 16 values" in str(w.message) for w in caught)  # a dense base says nothing
    resumed = tiny_peft_llama(seed=1)
    resumed.load_state_dict(saved)
    with pytest.warns(UserWarning, match=r"14 layer\(s\) .* hold at most 16 values in each group of 64.*load_quantized"):
        lowra_compile.quantize_(resumed, batch(16), options)


def test_a_base_saved_from_a_peft_model_loads_into_the_plain_one_and_back(tmp_path):
    # the file's names are the saved model's: one written under PEFT's wrapping ('base_model.model.',
    # '.base_layer.') was refused by the plain model it came from, and the other way round
    from peft import LoraConfig, get_peft_model

    from .dequantized import step_matches_the_dequantized_model
    from .tiny_models import batch, tiny_llama, tiny_peft_llama

    data = batch(16)
    peft_model = lowra_compile.quantize_(tiny_peft_llama(), data, {"bits": 2.0, "loftq_iters": 0, "progress": False})
    lowra_compile.save_quantized(peft_model, tmp_path / "peft.safetensors")
    plain = lowra_compile.load_quantized(tiny_llama(), tmp_path / "peft.safetensors")  # not frozen: load freezes
    assert sum(isinstance(p, ReleasedWeight) and not p.requires_grad for p in plain.parameters()) == 14
    with torch.no_grad():
        torch.testing.assert_close(plain(**data).logits, peft_model(**data).logits, rtol=0, atol=0)  # B = 0

    lowra_compile.save_quantized(plain, tmp_path / "plain.safetensors")
    wrapped = lowra_compile.load_quantized(tiny_peft_llama(), tmp_path / "plain.safetensors")
    assert sum(isinstance(p, ReleasedWeight) for p in wrapped.parameters()) == 14
    rewrapped = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))  # after loading
    for model in (wrapped, rewrapped):
        compiled = torch.compile(model, backend="lowra", options={"progress": False, "inner": "eager"})
        step_matches_the_dequantized_model(compiled, model, data)
        torch._dynamo.reset()


def test_a_base_saved_through_ddp_and_compile_wrappers_loads_into_the_bare_model_and_back(tmp_path):
    # DDP prefixes every name with `module.` (and torch.compile with `_orig_mod.`): such a file was refused by
    # the bare model, as one of the bare model was by the wrapped one, "load it into the architecture it was
    # saved from"
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    def ddp(model: torch.nn.Module) -> DistributedDataParallel:  # DDP wants something to train: the last bias
        model[2].bias.requires_grad_(True)
        return DistributedDataParallel(model)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, x = _quantized_mlp(), torch.randn(4, 64)
        for i, wrapped in enumerate((ddp(model), torch.compile(ddp(model)))):
            assert lowra_compile.save_quantized(wrapped, tmp_path / f"{i}.safetensors") == 2
            bare = lowra_compile.load_quantized(_frozen_mlp(), tmp_path / f"{i}.safetensors")
            torch.testing.assert_close(bare(x), model(x), rtol=0, atol=0)  # same seed: same biases
            into_wrapper = ddp(_frozen_mlp())
            lowra_compile.load_quantized(into_wrapper, tmp_path / f"{i}.safetensors")
            torch.testing.assert_close(into_wrapper.module(x), model(x), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_a_fresh_dora_adapter_on_a_loaded_base_starts_as_the_quantized_layer_and_a_trained_one_keeps_its_own(tmp_path):
    # PEFT sets a DoRA magnitude from the dense weight it is built on: loaded under it, the packed base's rows
    # are shorter (at 2 bits by up to a third), and a new run started from another layer than the quantized one
    from .tiny_models import batch, tiny_peft_llama

    data = batch(16)
    first = lowra_compile.quantize_(tiny_peft_llama(use_dora=True), data,
                                    {"bits": 2.0, "loftq_iters": 0, "progress": False})  # B stays 0
    lowra_compile.save_quantized(first, tmp_path / "base.safetensors")
    fresh = lowra_compile.load_quantized(tiny_peft_llama(use_dora=True), tmp_path / "base.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data).logits, first(**data).logits)

    trained = tiny_peft_llama(use_dora=True)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.uniform_(0.1, 0.2)
    saved = {n: p.clone() for n, p in trained.named_parameters() if "lora_magnitude" in n}
    lowra_compile.load_quantized(trained, tmp_path / "base.safetensors")
    for name, p in trained.named_parameters():
        if "lora_magnitude" in name:
            torch.testing.assert_close(p, saved[name], rtol=0, atol=0, msg=name)


def test_resuming_without_the_saving_runs_skip_warns_of_the_layers_it_left_dense(tmp_path):
    # the file held only the packed layers: a resumed run without `skip` quantized the ones kept dense, silently
    import warnings

    from .tiny_models import batch, tiny_peft_llama

    options = {"bits": 2.0, "loftq_iters": 0, "progress": False}
    first = lowra_compile.quantize_(tiny_peft_llama(), batch(16), {**options, "skip": ("down_proj",)})
    lowra_compile.save_quantized(first, tmp_path / "base.safetensors")
    resumed = lowra_compile.load_quantized(tiny_peft_llama(), tmp_path / "base.safetensors")
    with pytest.warns(UserWarning, match=r"2 layer\(s\) \(e.g. '.*layers.0.mlp.down_proj.base_layer.weight'\) "
                                         r"were left dense by the run that saved .*base.safetensors"):
        lowra_compile.quantize_(resumed, batch(16), options)

    resumed = lowra_compile.load_quantized(tiny_peft_llama(), tmp_path / "base.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowra_compile.quantize_(resumed, batch(16), {**options, "skip": ("down_proj",)})
    assert not [w for w in caught if "left dense by the run" in str(w.message)]
    assert not isinstance(resumed.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight, ReleasedWeight)
