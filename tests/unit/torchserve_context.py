"""For tests that call the TorchServe handler without TorchServe: what
:class:`~handlers.torchserve_handler.BeyondHandler` uses of TorchServe's context, and a
tiny model directory for it to load."""

from __future__ import annotations

from pathlib import Path

from protocol.spec import ModelSpec, Preprocessing


class FakeContext:
    """A model directory, a model config, and the request headers and reply statuses."""

    def __init__(self, model_dir: Path | None = None, response_timeout: int = 600) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_yaml_config = {"minWorkers": 1, "responseTimeout": response_timeout}
        self.status: dict[int, int] = {}
        self.headers: dict[str, str] = {}

    def get_all_request_header(self, index: int) -> dict[str, str]:
        return self.headers

    def set_response_header(self, index: int, name: str, value: str) -> None:
        pass

    def set_response_status(self, code: int, phrase: str, index: int) -> None:
        self.status[index] = code


def tiny_model_dir(directory: Path) -> Path:
    """``directory`` holding a random-weight shapes_resnet for 32x32 inputs (6 classes), as
    the handler loads it."""
    spec = ModelSpec(
        name="tiny", architecture="shapes_resnet", num_classes=6, random_weights=True,
        preprocessing=Preprocessing(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        labels=[f"c{i}" for i in range(6)],
    )
    (directory / "model_spec.json").write_text(spec.model_dump_json())
    return directory
