"""The Hugging Face Trainer on a model compiled with the lowra backend: train, evaluate, checkpoint.

Trainer's own `torch_compile_backend` only takes the backends accelerate lists, so the model is compiled
first and handed over; a compiled model's forward signature is (*args, **kwargs), so Trainer must be told
to keep every column and where the labels are (README, "With the Hugging Face Trainer").
"""

import pytest
import torch
from safetensors.torch import load_file

from lowra_compile.passes.release import ReleasedWeight

from .tiny_models import batch, tiny_peft_llama

transformers = pytest.importorskip("transformers")


def test_trainer_trains_evaluates_and_checkpoints_only_the_adapters(tmp_path):
    model = tiny_peft_llama()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.compile(backend="lowra", options={"bits": 2.0, "progress": False, "inner": "eager"})
    compiled = model
    rows = batch(16, size=16)["input_ids"]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
        save_steps=4, logging_steps=1, learning_rate=1e-2, use_cpu=True, report_to=[],
    )
    trainer = transformers.Trainer(model=compiled, args=args, train_dataset=data, eval_dataset=data[:8])
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]

    base = [p for n, p in model.named_parameters() if "base_layer" in n]
    assert base and all(isinstance(p, ReleasedWeight) for p in base)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(start[n], p) for n, p in trained.items() if "lora_B" in n)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    with torch.no_grad():
        expected = sum(compiled(input_ids=rows[i:i + 4], labels=rows[i:i + 4]).loss for i in (0, 4)) / 2
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)

    saved = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)  # no dequantized base weights in the checkpoint
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(value, trained[name].detach())
