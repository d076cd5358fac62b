"""
Modules kumoauth 0.1 had, found under their old names until 0.3.

0.2 grouped the package by concern (``auth/``, ``storage/``, ``smtp/``…).
A custom checker or a script written for 0.1 imports, say,
``kumoauth.cred``; :class:`MovedFinder` (last on ``sys.meta_path``, so it
is asked only for names nothing else finds) gives it the module's new home
under the old name, with a ``FutureWarning`` that names it.  Only the
modules 0.1's documentation offered are here; the rest were internals.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

#: old name -> new name
MOVED = {
    "kumoauth.cred": "kumoauth.auth.cred",
    "kumoauth.delivery": "kumoauth.storage.delivery",
    "kumoauth.spool": "kumoauth.storage.spool",
    "kumoauth.throttle": "kumoauth.auth.throttle",
    "kumoauth.sasl": "kumoauth.auth.sasl",
}


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._own: dict[str, Any] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} is now {new} (moved in kumoauth 0.2); the old name goes in 0.3",
            FutureWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._own[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The new module ran when it was imported.  importlib has just set
        # its __spec__ to the old name's: give it its own back (reload()
        # and tools that read __spec__.name would take it for the alias).
        name = next(old for old, new in MOVED.items() if new == module.__name__)
        module.__spec__ = self._own.pop(name)


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
