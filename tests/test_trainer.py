"""The Hugging Face Trainer on a model compiled with the lowra backend: train, evaluate, checkpoint, resume.

Trainer's own `torch_compile_backend` only takes the backends accelerate lists, so the model is compiled in
place (`nn.Module.compile`) and handed over as it is: Trainer still sees the PeftModel, its forward's
arguments and its adapter checkpoints (README, "With the Hugging Face Trainer"; docs/usage.md, "Hugging Face
Trainer details").
"""

import pytest
import torch
from safetensors.torch import load_file

import lowra_compile
from lowra_compile.passes.release import ReleasedWeight

from .tiny_models import batch, tiny_peft_llama

transformers = pytest.importorskip("transformers")
OPTIONS = {"bits": 2.0, "progress": False, "inner": "eager"}


def _trainer(model, data, output_dir):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
        save_steps=2, logging_steps=1, learning_rate=1e-2, use_cpu=True, report_to=[], seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dora", [False, True])
def test_trainer_trains_evaluates_checkpoints_the_adapters_and_resumes_on_the_saved_base(tmp_path, dora):
    model = tiny_peft_llama(use_dora=dora)
    start = _adapters(model)
    model.compile(backend="lowra", options=OPTIONS)
    rows = batch(16, size=16)["input_ids"]
    data = [{"input_ids": r, "labels": r} for r in rows]
    trainer = _trainer(model, data, tmp_path / "run")
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]

    base = [p for n, p in model.named_parameters() if "base_layer" in n]
    assert base and all(isinstance(p, ReleasedWeight) for p in base)
    trained = _adapters(model)
    assert any(not torch.equal(start[n], p) for n, p in trained.items() if "lora_B" in n)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    with torch.no_grad():
        expected = sum(model(input_ids=rows[i:i + 4], labels=rows[i:i + 4]).loss for i in (0, 4)) / 2
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)

    saved = load_file(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)  # no dequantized base weights in the checkpoint
    for key, value in saved.items():  # PEFT saves DoRA's magnitude without its parameter's ".weight"
        name = f"{key}.default.weight" if key.endswith("magnitude_vector") else key.replace(".weight", ".default.weight")
        torch.testing.assert_close(value, trained[name])
    assert len(saved) == len(trained)

    # Resume halfway in a new model: the adapters belong to this quantization, so the packed base comes along.
    lowra_compile.save_quantized(model, tmp_path / "base.safetensors")
    torch._dynamo.reset()
    resumed = lowra_compile.load_quantized(tiny_peft_llama(use_dora=dora), tmp_path / "base.safetensors")
    resumed.compile(backend="lowra", options=OPTIONS)
    _trainer(resumed, data, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for name, value in _adapters(resumed).items():
        torch.testing.assert_close(value, trained[name], msg=name)


def test_a_trainer_computing_the_loss_itself_is_named_by_the_warning_that_no_loss_gradient_reached_the_plan(tmp_path):
    # with label smoothing Trainer takes the labels out of the batch and computes the loss from the logits, so
    # the first (calibrating) call has no loss; the warning used to send the user after labels and graph breaks
    model = tiny_peft_llama()
    model.compile(backend="lowra", options=OPTIONS)
    rows = batch(16, size=4)["input_ids"]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, label_smoothing_factor=0.1,
        save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    with pytest.warns(UserWarning, match=r"no loss gradient reached .*label_smoothing_factor"):
        trainer.train()
    assert any(isinstance(p, ReleasedWeight) for p in model.parameters())
