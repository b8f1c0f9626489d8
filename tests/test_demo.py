"""`lowra demo`'s arguments: bad ones stop before the model is loaded."""

import re

import pytest

from lowra_compile import cli, demo


def _args(*argv: str):
    return cli.build_parser().parse_args(["demo", *argv])


def test_demo_calibrates_on_several_training_batches_by_default():
    args = _args()
    assert 1 < args.calib_batches <= args.steps


@pytest.mark.parametrize("argv,message", [
    (("--calib-batches", "0"), "--calib-batches: must be at least 1"),
    (("--steps", "3", "--calib-batches", "4"), r"--calib-batches must lie in \[1, --steps=3\]"),
    (("--bits", "5"), "bits=5.0 is outside"),
    (("--inner", "foo"), "--inner: invalid choice"),
    (("--rank", "0"), "--rank: must be at least 1"),
    (("--window", "x"), "--window: invalid _window value"),
])
def test_demo_rejects_bad_arguments_before_loading_the_model(argv, message, model_must_not_load, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", *argv])
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("argv,dora_layers", [((), 0), (("--dora",), 14)])
def test_demo_adapts_every_projection_with_lora_or_with_dora(argv, dora_layers):
    from .tiny_models import tiny_llama

    model = demo.lora_model(tiny_llama(), rank=4, dora=_args(*argv).dora)
    adapted = [m for m in model.modules() if hasattr(m, "lora_magnitude_vector")]
    assert len(adapted) == 14 and sum(len(m.lora_magnitude_vector) for m in adapted) == dora_layers
