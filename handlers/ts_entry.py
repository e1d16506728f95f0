"""The file packed into each model archive as TorchServe's ``--handler``.

TorchServe imports it from the unpacked archive; everything else comes from the installed
``beyond`` package (``handlers``), so an archive stays a few kilobytes of glue.
"""

from typing import Any

from handlers.torchserve_handler import BeyondHandler

_service = BeyondHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    if _service.runner is None:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
