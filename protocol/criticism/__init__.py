"""Model criticism: choose prototypes and criticisms of a class (torch-free).

``select(method, SelectionInputs(...), params)`` with ``method`` in ``adversarial``,
``mmd``, ``probs``, ``random`` (paper 000, sections 2 and 3.3) and ``gallery_png`` for the
picture. Nothing imported here needs torch, so the RQ workers can use it; the torch-side
helper that gathers the inputs from a model in-process is ``handlers.criticism.gather``.
"""

from protocol.criticism.gallery import gallery_png
from protocol.criticism.methods import (
    SelectedItem,
    Selection,
    SelectionInputs,
    SelectionMethod,
    available_selections,
    get_selection,
    register_selection,
    select,
)

__all__ = [
    "SelectedItem",
    "Selection",
    "SelectionInputs",
    "SelectionMethod",
    "available_selections",
    "gallery_png",
    "get_selection",
    "register_selection",
    "select",
]
