"""Explanation methods behind one protocol and a name registry.

Importing this package registers every method::

    from handlers.explainers import explain
    result = explain(model, images, "smoothgrad", {"n": 50}, targets=None)
    result.relevance  # (B, 3, H, W) float32

Each method's parameter model lives torch-free in :mod:`protocol.params.explainers`.
Citations such as ``[doValle2019, §4.2.1]`` are keys into ``docs/references.md``.
"""

from handlers.explainers import (  # noqa: F401 - imported to register the methods
    gradcam,
    gradient,
    integrated_gradients,
    lime,
    lrp,
    nam,
    sis,
    smoothgrad,
)
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
