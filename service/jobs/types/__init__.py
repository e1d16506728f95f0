"""Every job type, one module each (see :mod:`service.jobs.registry`); importing this
package registers them all and builds the gateway's job unions from them.

A new job type is a module here, named after its type, and its name in :data:`MODULES`,
whose order is the order of the unions in the OpenAPI document.
"""

from __future__ import annotations

import importlib

from service.jobs.registry import JOB_TYPES, request_union, result_union

MODULES = ("criticism", "filter", "apem", "audit", "evaluate", "overinterpretation")
for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")

JobRequest = request_union(JOB_TYPES.values())
"""The ``POST /v1/jobs`` body: one of the registered request models, chosen by ``type``."""
JobResult = result_union(JOB_TYPES.values())
"""``GET /v1/jobs/{id}/result``: one of the registered result models, chosen by ``type``."""

__all__ = ["JOB_TYPES", "MODULES", "JobRequest", "JobResult"]
