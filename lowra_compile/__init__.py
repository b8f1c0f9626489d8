"""lowra-compile: `torch.compile(model, backend="lowra")` for LoRA on 1-4 bit mixed-precision base weights."""

from . import runtime
from .config import LowRAConfig

__all__ = ["LowRAConfig", "runtime"]
