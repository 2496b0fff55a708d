"""Package names imported on first use (PEP 562), so that a command needing one light
submodule does not load torch with the package (``fpo-judge-check``, ``fpo-make-sae --help``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: reading ``name`` (a key of
    ``exports``) imports ``package.<exports[name]>`` and returns its ``name``; any other name
    raises ``AttributeError`` as a missing attribute would."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
