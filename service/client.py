"""A Python client and command line for the Beyond gateway (httpx only, no torch).

Python::

    from service.client import BeyondClient
    with BeyondClient("http://127.0.0.1:8000", api_key) as beyond:
        beyond.predict("shapes-resnet", "star.png")
        beyond.explain("shapes-resnet", "star.png", "lrp", score="apem")
        job = beyond.submit_job({"type": "apem", "model": "shapes-resnet",
                                 "dataset_id": beyond.upload_dataset("my_images/")["dataset_id"],
                                 "method": "lrp"})
        result = beyond.wait_result(job)

Command line (``python -m service.client --help``): every command prints the reply as JSON;
pictures (base64 PNG fields) are written to ``--save-dir`` if given and shown by size.
The API key comes from ``--api-key``, ``BEYOND_API_KEY``, or the key ``make up`` stored.

Errors are raised as :class:`BeyondError` with the gateway's code and message. A 429
(``overloaded``) or 503 (``model_server_busy``) is retried after its ``Retry-After``, up to
``retries`` times, so a client backs off instead of failing under load.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

Image = str | Path | bytes
"""An image: a file path, or the file's bytes."""

RETRIED = (429, 503)
JOB_ENDED = ("finished", "failed", "canceled")


class BeyondError(Exception):
    """A refusal or failure of the gateway: HTTP status, error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _bytes(image: Image) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _form(fields: Mapping[str, Any]) -> dict[str, str]:
    """Form fields as strings: dicts as JSON, booleans as true/false, None left out."""
    form = {}
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, dict):
            form[name] = json.dumps(value)
        elif isinstance(value, bool):
            form[name] = "true" if value else "false"
        elif isinstance(value, list | tuple):
            form[name] = ",".join(map(str, value))
        else:
            form[name] = str(value)
    return form


def folder_archive(folder: Path) -> bytes:
    """A dataset folder (``class_name/image`` files) as an in-memory zip archive."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())
    return out.getvalue()


class BeyondClient:
    """The gateway's HTTP API as methods returning the JSON replies.

    Args:
        base_url: the gateway, e.g. ``http://127.0.0.1:8000``.
        api_key: a bearer key the gateway accepts.
        timeout: seconds per request (explanations of large images take a while).
        retries: how often a 429 or 503 is retried after its ``Retry-After``.
        http: an ``httpx.Client`` to use instead of a new one (tests pass the app's); the
            caller keeps it open or closes it.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 300.0,
        retries: int = 5,
        http: httpx.Client | None = None,
    ) -> None:
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self._owns_http = http is None
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.retries = retries

    def __enter__(self) -> BeyondClient:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owns_http:
            self.http.close()

    # ------------------------------------------------------------------ plumbing
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; 429/503 retried after ``Retry-After``; other errors as BeyondError."""
        for attempt in range(self.retries + 1):
            reply = self.http.request(method, path, **kwargs)
            if reply.status_code not in RETRIED or attempt == self.retries:
                break
            time.sleep(float(reply.headers.get("retry-after", 1)))
        if reply.status_code >= 400:
            try:
                error = reply.json()["error"]
                code, message = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", reply.text[:500]
            raise BeyondError(reply.status_code, code, message)
        return reply.json()

    def _image_call(self, route: str, model: str, image: Image, fields: Mapping[str, Any],
                    files: Mapping[str, Any] | None = None, query: Mapping[str, Any] | None = None) -> Any:
        upload = {"image": ("image", _bytes(image), "application/octet-stream"), **(files or {})}
        return self.request("POST", f"/v1/models/{model}/{route}", data=_form(fields), files=upload,
                            params=dict(query or {}))

    # ------------------------------------------------------------------ models
    def models(self) -> Any:
        return self.request("GET", "/v1/models")

    def model(self, model: str) -> Any:
        return self.request("GET", f"/v1/models/{model}")

    def predict(self, model: str, image: Image, top_k: int = 5) -> Any:
        return self._image_call("predict", model, image, {}, query={"top_k": top_k})

    def explain(self, model: str, image: Image, method: str, *, params: dict | None = None,
                target: int | None = None, stage: int | None = None, outputs: list[str] | None = None,
                colormap: str | None = None, score: str | None = None, apem_params: dict | None = None) -> Any:
        fields = {"method": method, "params": params, "target": target, "stage": stage, "outputs": outputs,
                  "colormap": colormap, "score": score, "apem_params": apem_params}
        return self._image_call("explain", model, image, fields)

    def attack(self, model: str, image: Image, method: str, *, params: dict | None = None,
               explain: str | None = None, explain_params: dict | None = None,
               adversarial_array: bool | None = None) -> Any:
        fields = {"method": method, "params": params, "explain": explain, "explain_params": explain_params,
                  "adversarial_array": adversarial_array}
        return self._image_call("attack", model, image, fields)

    def apem(self, model: str, image: Image, method: str | None = None, *, relevance: bytes | Path | None = None,
             params: dict | None = None, target: int | None = None, apem_params: dict | None = None) -> Any:
        files = None
        if relevance is not None:
            files = {"relevance": ("relevance.npy", _bytes(relevance), "application/octet-stream")}
        fields = {"method": method, "params": params, "target": target, "apem_params": apem_params}
        return self._image_call("apem", model, image, fields, files=files)

    # ------------------------------------------------------------------ datasets and jobs
    def upload_dataset(self, source: str | Path | bytes) -> Any:
        """Upload a folder of ``class_name/image`` files, or a zip / tar.gz archive."""
        if isinstance(source, bytes):
            data, name = source, "dataset.zip"
        elif Path(source).is_dir():
            data, name = folder_archive(Path(source)), "dataset.zip"
        else:
            data, name = Path(source).read_bytes(), Path(source).name
        return self.request("POST", "/v1/datasets", files={"archive": (name, data, "application/octet-stream")})

    def dataset(self, dataset_id: str) -> Any:
        return self.request("GET", f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str) -> Any:
        return self.request("DELETE", f"/v1/datasets/{dataset_id}")

    def submit_job(self, spec: Mapping[str, Any]) -> str:
        """Queue a job (criticism, filter, apem, audit, evaluate, overinterpretation); its id."""
        return str(self.request("POST", "/v1/jobs", json=dict(spec))["job_id"])

    def job(self, job_id: str) -> Any:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> Any:
        return self.request("DELETE", f"/v1/jobs/{job_id}")

    def job_result(self, job_id: str) -> Any:
        return self.request("GET", f"/v1/jobs/{job_id}/result")

    def wait_result(self, job_id: str, timeout: float = 3600.0, poll: float = 0.5) -> Any:
        """Poll until the job ends; its result, or BeyondError with the failure's reason."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.job(job_id)
            if status["status"] in JOB_ENDED:
                return self.job_result(job_id)  # 409 with the reason unless finished
            if time.monotonic() > deadline:
                raise BeyondError(408, "client_timeout", f"job {job_id} still {status['status']} after {timeout} s")
            time.sleep(poll)


# ---------------------------------------------------------------------- command line
def shown(reply: Any, save_dir: Path | None, prefix: str = "") -> Any:
    """``reply`` with every base64 PNG replaced by its size (and written to ``save_dir``)."""
    if isinstance(reply, dict):
        out = {}
        for key, value in reply.items():
            name = f"{prefix}{key}"
            if isinstance(value, str) and key.endswith("_png"):
                data = base64.b64decode(value)
                if save_dir is not None:
                    save_dir.mkdir(parents=True, exist_ok=True)
                    (save_dir / f"{name}.png").write_bytes(data)
                out[key] = f"<png, {len(data)} bytes{'' if save_dir is None else f', {name}.png'}>"
            else:
                out[key] = shown(value, save_dir, f"{name}.")
        return out
    if isinstance(reply, list):
        return [shown(v, save_dir, f"{prefix}{i}.") for i, v in enumerate(reply)]
    return reply


def _json_arg(text: str | None) -> dict | None:
    if text is None:
        return None
    path = Path(text)
    return json.loads(path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.client", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("BEYOND_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", help="default: $BEYOND_API_KEY, else the key `make up` stored")
    parser.add_argument("--save-dir", type=Path, help="write the reply's PNG pictures here")
    parser.add_argument("--timeout", type=float, default=300.0)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="the served models")
    for name in ("predict", "explain", "attack", "apem"):
        command = commands.add_parser(name, help=f"POST /v1/models/MODEL/{name}")
        command.add_argument("model")
        command.add_argument("image", type=Path)
        if name == "predict":
            command.add_argument("--top-k", type=int, default=5)
            continue
        command.add_argument("--method", required=name != "apem")
        command.add_argument("--params", help="JSON object (or a file holding one)")
        if name in ("explain", "apem"):
            command.add_argument("--target", type=int)
            command.add_argument("--apem-params", help="JSON object (or a file holding one)")
        if name == "explain":
            command.add_argument("--stage", type=int)
            command.add_argument("--outputs", help="comma-separated, e.g. relevance,heatmap_png")
            command.add_argument("--colormap")
            command.add_argument("--score-apem", action="store_true")
        if name == "attack":
            command.add_argument("--explain", help="explain the adversarial image with this method")
            command.add_argument("--explain-params")
        if name == "apem":
            command.add_argument("--relevance", type=Path, help=".npy map in [0, 1] instead of --method")
    upload = commands.add_parser("upload", help="upload a dataset folder or archive")
    upload.add_argument("source", type=Path)
    job = commands.add_parser("job", help="submit a job (JSON spec or file) and wait for its result")
    job.add_argument("spec")
    job.add_argument("--no-wait", action="store_true", help="print the job id and return")
    for name in ("status", "result", "cancel"):
        commands.add_parser(name, help=f"a job's {name}").add_argument("job_id")
    return parser


def _api_key(given: str | None) -> str | None:
    if given or os.environ.get("BEYOND_API_KEY"):
        return given or os.environ["BEYOND_API_KEY"]
    from service.settings import get_settings

    keys = get_settings().resolved_api_keys()
    return keys[0] if keys else None


def run(args: argparse.Namespace, beyond: BeyondClient) -> Any:
    """One command's reply."""
    if args.command == "models":
        return beyond.models()
    if args.command == "predict":
        return beyond.predict(args.model, args.image, args.top_k)
    if args.command == "explain":
        return beyond.explain(args.model, args.image, args.method, params=_json_arg(args.params), target=args.target,
                              stage=args.stage, outputs=args.outputs and args.outputs.split(","),
                              colormap=args.colormap, score="apem" if args.score_apem else None,
                              apem_params=_json_arg(args.apem_params))
    if args.command == "attack":
        return beyond.attack(args.model, args.image, args.method, params=_json_arg(args.params),
                             explain=args.explain, explain_params=_json_arg(args.explain_params))
    if args.command == "apem":
        return beyond.apem(args.model, args.image, args.method, relevance=args.relevance,
                           params=_json_arg(args.params), target=args.target, apem_params=_json_arg(args.apem_params))
    if args.command == "upload":
        return beyond.upload_dataset(args.source)
    if args.command == "job":
        job_id = beyond.submit_job(_json_arg(args.spec) or {})
        return {"job_id": job_id} if args.no_wait else beyond.wait_result(job_id)
    return {"status": beyond.job, "result": beyond.job_result, "cancel": beyond.cancel_job}[args.command](args.job_id)


def main(argv: list[str] | None = None, http: httpx.Client | None = None) -> int:
    """The command line; ``http`` replaces the connection to ``--url`` (tests)."""
    args = _parser().parse_args(argv)
    with BeyondClient(args.url, _api_key(args.api_key), timeout=args.timeout, http=http) as beyond:
        try:
            reply = run(args, beyond)
        except BeyondError as error:
            print(json.dumps({"error": {"status": error.status, "code": error.code, "message": error.message}}),
                  file=sys.stderr)
            return 1
    print(json.dumps(shown(reply, args.save_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
