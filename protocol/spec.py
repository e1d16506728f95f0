"""What a served model is: its preprocessing, labels and provenance (torch-free).

Written into every model archive as ``model_spec.json`` by ``model_store.build`` and read
back by the TorchServe handler; the gateway gets the same object from the handler's
``describe`` task. Pydantic only, so the gateway and workers can import it without torch.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Preprocessing(BaseModel):
    """How raw RGB pixels become the model's input.

    The image is resized so its shorter side is ``resize``, centre-cropped to
    ``crop`` x ``crop`` and scaled to [0, 1]. ``mean``/``std`` normalisation happens inside
    the served model (see ``handlers.models.classifier``), so every explainer and attack
    works in [0, 1] pixel space.
    """

    model_config = ConfigDict(frozen=True)

    resize: int = Field(gt=0)
    crop: int = Field(gt=0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ModelSpec(BaseModel):
    """Everything needed to rebuild and describe a served classifier."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    name: str
    version: str = "1.0"
    architecture: str
    num_classes: int = Field(gt=1)
    preprocessing: Preprocessing
    labels: list[str]
    metrics: dict[str, float] = Field(default_factory=dict)
    data_seed: int | None = None
    train_seed: int | None = None
    random_weights: bool = False
    description: str = ""

    @property
    def input_size(self) -> int:
        return self.preprocessing.crop
