"""`lowra demo`'s arguments: bad calibration counts stop before the model is loaded."""

import argparse

import pytest

from lowra_compile import demo


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_demo_calibrates_on_several_training_batches_by_default():
    args = _args()
    assert 1 < args.calib_batches <= args.steps


@pytest.mark.parametrize("argv", [("--calib-batches", "0"), ("--steps", "3", "--calib-batches", "4")])
def test_demo_rejects_calibration_batches_outside_the_training_batches(argv, model_must_not_load):
    with pytest.raises(SystemExit, match="--calib-batches"):
        demo.run(_args(*argv))


@pytest.mark.parametrize("argv,dora_layers", [((), 0), (("--dora",), 14)])
def test_demo_adapts_every_projection_with_lora_or_with_dora(argv, dora_layers):
    from .tiny_models import tiny_llama

    model = demo.lora_model(tiny_llama(), rank=4, dora=_args(*argv).dora)
    adapted = [m for m in model.modules() if hasattr(m, "lora_magnitude_vector")]
    assert len(adapted) == 14 and sum(len(m.lora_magnitude_vector) for m in adapted) == dora_layers
