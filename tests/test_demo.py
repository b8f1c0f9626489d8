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
