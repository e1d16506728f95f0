"""Import every module of a package, so that the ones declaring a feature register it.

The registries (contract tasks, handler runners, job types) are filled by their modules'
decorators at import; importing the package's modules by discovery instead of by a list
is what makes a new task or job type one module, with no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from types import ModuleType


def import_submodules(package: str, path: Iterable[str]) -> list[ModuleType]:
    """Import each module directly under ``package`` (its ``__path__``), in name order.

    Name order makes the registries' order, and so every union built from them, the same
    on every machine.
    """
    names = sorted(info.name for info in pkgutil.iter_modules(list(path)))
    return [importlib.import_module(f"{package}.{name}") for name in names]
