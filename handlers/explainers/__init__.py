"""Explanation methods behind one protocol and a name registry.

Importing this package imports every module in it, which registers every method (a new
method is one module here, with its parameter model in :mod:`protocol.params.explainers`)::

    from handlers.explainers import explain
    result = explain(model, images, "smoothgrad", {"n": 50}, targets=None)
    result.relevance  # (B, 3, H, W) float32

Each method's parameter model lives torch-free in :mod:`protocol.params.explainers`.
Citations such as ``[doValle2019, §4.2.1]`` are keys into ``docs/references.md``.
"""

from handlers.explainers.base import (
    Attribution,
    Explainer,
    ExplainerParams,
    Explanation,
    InvalidParameter,
    UnknownMethod,
    available_explainers,
    create_explainer,
    explain,
    get_explainer,
    register,
)
from protocol.discovery import import_submodules

import_submodules(__name__, __path__)  # each method's module registers it

__all__ = [
    "Attribution",
    "Explainer",
    "ExplainerParams",
    "Explanation",
    "InvalidParameter",
    "UnknownMethod",
    "available_explainers",
    "create_explainer",
    "explain",
    "get_explainer",
    "register",
]
