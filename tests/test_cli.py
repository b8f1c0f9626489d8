"""The `lowra` command's plan and bench on tiny inputs (the SmolLM2 loading around them is the demo's)."""

import importlib.util
import json
import warnings

import pytest
import torch

import lowra_compile
from lowra_compile import cli

from .tiny_models import VOCAB, tiny_llama


@pytest.mark.parametrize("bits", [1.5, 3.0])
def test_plan_quantizes_every_linear_of_a_trainable_model_at_the_budget(bits):
    # A model as loaded for training has trainable weights, which lowra leaves dense: `lowra plan` printed
    # an empty report for SmolLM2 until it froze the model first.
    model = tiny_llama()
    args = cli.build_parser().parse_args(["plan", "--bits", str(bits), "--batch", "2"])
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.quantize_for_plan(model, ids, args)
    said = " ".join(str(w.message) for w in caught)
    assert "nothing in this graph is quantized" not in said and "no loss gradient" not in said
    assert "calibrating on 128 tokens (2 batches)" in said  # the windows ran as batches of 2
    report = lowra_compile.report(model)
    assert len(report.layers) == 14  # 7 linears in each of 2 layers; lm_head stays dense
    assert report.code_bits == pytest.approx(bits, abs=0.01)


@pytest.mark.parametrize("argv,message", [
    (("plan", "--batch", "0"), "--batch: must be at least 1"),
    (("plan", "--windows", "0"), "--windows: must be at least 1"),
    (("plan", "--window", "-1"), "--window: must be at least 2"),
    (("demo", "--window", "1"), "--window: must be at least 2"),  # no token to predict: a ZeroDivisionError later
    (("demo", "--lr", "-1"), "--lr: must be a finite number above 0"),  # AdamW refused it minutes later
    (("demo", "--lr", "nan"), "--lr: must be a finite number above 0"),
    (("demo", "--bits", "5"), "lowra demo: error: --bits=5.0 is outside"),  # named as the flag, and the command
    (("plan", "--bits", "5"), "--bits=5.0 is outside"),
    (("plan", "--choices", "1,5"), "must be a non-empty subset"),
    (("report", "--choices", "2,4", "--bits", "1.5"), "add smaller widths to --choices"),  # named as the flag
    (("plan", "--choices", "a,b"), "expected comma-separated bit widths"),
    (("report", "--json", "/nonexistent-folder/r.json"), "the folder of /nonexistent-folder/r.json does not exist"),
    (("report", "--json", "/"), "/ is a folder; give a file name in it"),
    (("report", "--markdown", "/proc/r.md"), "cannot write /proc/r.md"),
    (("bench", "--iters", "0"), "--iters: must be at least 1"),
    (("report",), "give at least one of --json, --markdown, --png"),  # it quantized, then wrote nothing
    (("report", "--json", "r.out", "--markdown", "r.out"), "name one file twice"),
])
def test_bad_arguments_stop_before_the_model_loads(argv, message, model_must_not_load, capsys):
    with pytest.raises(SystemExit):
        cli.main(list(argv))
    assert message in capsys.readouterr().err


def test_bench_times_the_packed_op_and_the_dense_step(capsys):
    cli.main(["bench", "--m", "8", "--k", "128", "--n", "64", "--rank", "4", "--iters", "1"])
    result = json.loads(capsys.readouterr().out)
    assert (result["m"], result["k"], result["n"]) == (8, 128, 64)
    assert result["lowra_ms"] > 0 and result["dense_lora_ms"] > 0
    assert result["widths"] == [2]


def test_bench_refuses_a_budget_it_has_no_widths_for(capsys):
    with pytest.raises(SystemExit):  # it timed the 2.5-bit mix for any unknown value
        cli.main(["bench", "--bits", "1.25"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_report_png_without_matplotlib_stops_before_the_model_loads(model_must_not_load, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    with pytest.raises(SystemExit):
        cli.main(["report", "--png", "r.png"])
    assert "--png needs matplotlib" in capsys.readouterr().err


def test_report_files_given_as_option_equals_tilde_are_under_the_home_folder(monkeypatch, tmp_path, model_must_not_load, capsys):
    # the shell expands ~ in `--json ~/r.json` but not in `--json=~/r.json`: it reached open() as a folder "~"
    monkeypatch.setenv("HOME", str(tmp_path))
    args = cli.build_parser().parse_args(["report", "--json=~/r.json", "--markdown=~/r.md"])
    assert (args.json, args.markdown) == (tmp_path / "r.json", tmp_path / "r.md")
    with pytest.raises(SystemExit):
        cli.main(["report", "--json=~/missing/r.json"])
    assert f"the folder of {tmp_path}/missing/r.json does not exist" in capsys.readouterr().err
