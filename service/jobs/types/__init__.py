"""Every job type, one module each (see :mod:`service.jobs.registry`); importing this
package imports every module in it, which registers them all, and builds the gateway's job
unions from them. A new job type is a module here, named after its type: nothing else lists
job types.
"""

from __future__ import annotations

from protocol.discovery import import_submodules
from service.jobs.registry import JOB_TYPES, request_union, result_union

MODULES = tuple(
    module.__name__.rsplit(".", 1)[1] for module in import_submodules(__name__, __path__)
)
"""The job type modules found here, in name order (the order of the unions in OpenAPI)."""

JobRequest = request_union(JOB_TYPES.values())
"""The ``POST /v1/jobs`` body: one of the registered request models, chosen by ``type``."""
JobResult = result_union(JOB_TYPES.values())
"""``GET /v1/jobs/{id}/result``: one of the registered result models, chosen by ``type``."""

__all__ = ["JOB_TYPES", "MODULES", "JobRequest", "JobResult"]
