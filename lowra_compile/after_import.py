"""Run a function on a module right after its first import, without importing it ourselves.

lowra adjusts how Dynamo sees a few functions of other libraries (PEFT's DoRA, the `kernels` package that
transformers uses). Importing those libraries to do it would slow `import lowra_compile` and import
packages the user may never use, so the adjustment waits for the library's own import.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Callable


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `action(module)` right after the module `name` is first imported: a finder ahead of the others
    that hands the import to them and wraps the loader it gets back."""

    def __init__(self, name: str, action: Callable[[ModuleType], None]):
        self.name, self.action = name, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_act(module: ModuleType) -> None:
            exec_module(module)
            self.action(module)

        spec.loader.exec_module = exec_then_act
        return spec


def call_after_import(name: str, action: Callable[[ModuleType], None]) -> None:
    """Call `action(module)` now if the module `name` is imported, else right after it first is."""
    if name in sys.modules:
        action(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, action))
