"""Server-independent task execution: contract requests in, contract results out.

Each module here is one task of ``protocol.contract``: it defines the task's runner and
registers it (:mod:`handlers.tasks.registry`); :class:`TaskRunner` dispatches a request to
its task's runner, on one :class:`ServedModel` built when the worker starts. Shared
helpers are in :mod:`handlers.tasks.common`. Any model server needs only a thin adapter
around the runner (``handlers.torchserve_handler`` is TorchServe's); the runner itself
knows nothing about HTTP or TorchServe. Importing this package imports every module in it,
which registers every runner (a new task's runner is one new module, listed nowhere), and
fails if a contract task has no runner.
"""

from handlers.tasks.common import TaskError
from handlers.tasks.registry import RUNNERS, TaskRunner, check_runners
from handlers.tasks.served import ServedModel
from protocol.discovery import import_submodules

import_submodules(__name__, __path__)  # each task module registers its runner

check_runners()

__all__ = ["RUNNERS", "ServedModel", "TaskError", "TaskRunner"]
