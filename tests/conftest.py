"""Test setup: Triton kernels run in the interpreter on CPU machines; each test gets a fresh Dynamo cache (and
its recompile limit back)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402


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
