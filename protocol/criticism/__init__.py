"""Model criticism: choose prototypes and criticisms of a class (torch-free).

``select(method, SelectionInputs(...), params)`` with ``method`` in ``adversarial``,
``mmd``, ``probs``, ``random`` ([Stock2018, §2, §3.3]) and ``gallery_png`` for the picture.
Nothing imported here needs torch, so the RQ workers can use it; the inputs come from the
model server's ``embed`` and ``robustness`` tasks. Citations such as ``[Stock2018, §3.3]``
are keys into ``docs/references.md``.
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
