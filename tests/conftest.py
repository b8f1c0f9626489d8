"""Test setup: Triton kernels run in the interpreter on CPU machines; the cores are shared among xdist's
workers; each test gets a fresh Dynamo cache (and its recompile limit back)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

# Under pytest-xdist (the default: pyproject's addopts) each worker is one process; torch's default of a
# thread per core in every worker would oversubscribe the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):  # lowra may raise it
        yield
    torch._dynamo.reset()


@pytest.fixture
def planned_statistics(monkeypatch) -> list:
    """The statistics (one SiteStats per layer) that each `lowra_compile.quantize_` call plans on."""
    import lowra_compile.api as api

    seen = []
    quantize_layers = api.quantize_layers
    monkeypatch.setattr(api, "quantize_layers", lambda layers, stats, *a, **k: seen.append(stats) or
                        quantize_layers(layers, stats, *a, **k))
    return seen


@pytest.fixture
def model_must_not_load(monkeypatch) -> None:
    """Fails the test if SmolLM2 is loaded: for argument checks that must stop before it."""
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("lowra_compile.smollm.load_smollm2", no_model)
