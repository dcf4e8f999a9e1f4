"""asyncua's client side without its server: a few MB less memory for the gateway's whole life.

``import asyncua`` runs the package's ``__init__``, which imports the client, the server (its
address space, pub/sub) and ``importlib.metadata`` for ``__version__``. A gateway only uses the
client. :func:`install` adds an import hook for the ``asyncua`` package alone: the first
``import asyncua`` anywhere in the process gets the real package (same files, same submodules)
with a shorter ``__init__`` in its place. Like the real one, it imports ``asyncua.common`` first
(its submodules import each other in that order) and offers ``Node`` and ``uamethod``; ``Client``,
``Server`` and ``__version__`` are resolved on first use (PEP 562). So ``from asyncua import
Server, ua`` still works anywhere in the process (tests and the demo plant run servers), and a
gateway that never opens an OPC UA device never imports asyncua at all.

Nothing here runs until something imports asyncua; when the hook cannot find the package, the
normal import machinery reports it as usual. Figures: docs/benchmarks.md ("Memory with both models").
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

# asyncua/__init__.py (2.x) re-exports these; name -> the submodule that defines it
_LAZY = {"Client": "asyncua.client", "Server": "asyncua.server"}


def install() -> None:
    """Load asyncua lean from now on (no effect when it is imported already or the hook is in)."""
    if "asyncua" in sys.modules or any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != "asyncua":
            return None
        sys.meta_path.remove(self)  # once: the package stays in sys.modules from now on
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec.loader = _LeanInit()
        return spec


class _LeanInit(importlib.abc.Loader):
    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        module.__getattr__ = _resolve  # type: ignore[method-assign]
        common = importlib.import_module("asyncua.common")
        module.Node, module.uamethod = common.Node, common.uamethod  # type: ignore[attr-defined]


def _resolve(name: str) -> Any:
    if name == "__version__":
        from importlib import metadata

        value: Any = metadata.version("asyncua")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'asyncua' has no attribute {name!r}")
    setattr(sys.modules["asyncua"], name, value)
    return value
