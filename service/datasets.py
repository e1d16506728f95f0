"""Dataset archives: safe extraction, image validation, content-addressed storage.

An archive (zip, tar or tar.gz, recognised by signature) holds ``class_name/image`` files
and optionally a root ``metadata.json`` or ``metadata.csv``, and soft region masks
(``_masks/<kind>/<the image's path>``, kind ``core`` or ``spurious``, an image of the same size
whose grey level is the mask; Singla & Feizi's annotations [Singla2022]). Nothing is ever
extracted with ``extractall``: each member is checked (no absolute paths, no ``..``, no
links or devices), counted against the file-count and total-unpacked-size limits, read with
a cap, validated by :func:`service.imaging.decode_image` and stored as canonical PNG under
``<data>/blobs/<sha[:2]>/<sha>.png``. The manifest ``<data>/datasets/<id>.json`` lists
class, original file name and hash of each image; the id is a hash of that list and of the
metadata, so the same upload gives the same id and one with other metadata (votes, ground
truth) another: no upload replaces an earlier dataset. Unreadable images are skipped and
reported.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from service.errors import ApiError
from service.imaging import decode_image
from service.settings import Settings

METADATA_NAMES = {"metadata.json", "metadata.csv"}
MASKS_FOLDER = "_masks"
MASK_KINDS = ("core", "spurious")
MAX_METADATA_BYTES = 1024 * 1024
_ID_CHARS = set("0123456789abcdef")


@dataclass
class _Member:
    name: str
    size: int
    read: Any  # () -> binary file object


class _Budget:
    def __init__(self, settings: Settings) -> None:
        self.max_files = settings.max_archive_files
        self.max_total = settings.max_archive_unpacked_bytes
        self.files = 0
        self.total = 0

    def count_file(self) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise ApiError(
                413, "archive_too_many_files", f"the archive has more than {self.max_files} files"
            )

    def add_bytes(self, n: int) -> None:
        self.total += n
        if self.total > self.max_total:
            raise ApiError(
                413,
                "archive_too_large_unpacked",
                f"the archive unpacks to more than {self.max_total} bytes",
            )


def _unsafe(reason: str, name: str) -> ApiError:
    shown = name if len(name) <= 120 else name[:117] + "..."
    return ApiError(422, "unsafe_archive", f"{reason}: {shown!r}")


def safe_member_path(name: str) -> PurePosixPath:
    """The member's relative path, or ApiError 422 if it could escape the dataset folder."""
    if not name or "\x00" in name or "\\" in name:
        raise _unsafe("entry name is not a plain relative path", name)
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise _unsafe("path traversal entry", name)
    if path.parts and ":" in path.parts[0]:
        raise _unsafe("entry name with a drive", name)
    return path


def _zip_members(fileobj: IO[bytes]) -> Iterator[_Member]:
    try:
        archive = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ApiError(422, "invalid_archive", "the zip archive is corrupt") from None
    with archive:
        for info in archive.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _unsafe("symbolic link entry", info.filename)
            if info.is_dir():
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                raise _unsafe("special file entry", info.filename)
            yield _Member(info.filename, info.file_size, lambda info=info: archive.open(info))


def _tar_members(fileobj: IO[bytes], mode: str) -> Iterator[_Member]:
    try:
        archive = tarfile.open(fileobj=fileobj, mode=mode)  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError):
        raise ApiError(422, "invalid_archive", "the tar archive is corrupt") from None
    with archive:
        try:
            for member in archive:
                if member.issym() or member.islnk():
                    raise _unsafe("link entry", member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise _unsafe("special file entry", member.name)
                yield _Member(member.name, member.size, lambda m=member: archive.extractfile(m))
        except (tarfile.TarError, OSError, EOFError):
            raise ApiError(
                422, "invalid_archive", "the tar archive is corrupt or truncated"
            ) from None


def iter_members(fileobj: IO[bytes]) -> Iterator[_Member]:
    head = fileobj.read(512)
    fileobj.seek(0)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _zip_members(fileobj)
    if head[:2] == b"\x1f\x8b":
        return _tar_members(fileobj, "r:gz")
    if len(head) >= 262 and head[257:262] == b"ustar":
        return _tar_members(fileobj, "r:")
    raise ApiError(415, "unsupported_archive", "the archive must be zip, tar or tar.gz")


def _read_member(member: _Member, cap: int, budget: _Budget) -> bytes | None:
    """The member's bytes, or None when over ``cap`` (counted against the budget as read)."""
    budget.add_bytes(0 if member.size < 0 else min(member.size, cap + 1))
    if member.size > cap:
        return None
    chunks: list[bytes] = []
    got = 0
    try:
        with member.read() as handle:
            while chunk := handle.read(min(65536, cap + 1 - got)):
                got += len(chunk)
                if got > cap:
                    return None
                chunks.append(chunk)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, RuntimeError, ValueError):
        raise ApiError(422, "invalid_archive", f"cannot read entry {member.name[:120]!r}") from None
    if got > member.size:  # a lying header: count what was really unpacked
        budget.add_bytes(got - member.size)
    return b"".join(chunks)


def _parse_metadata(name: str, data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
        if name.endswith(".json"):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            return value
        return list(csv.DictReader(io.StringIO(text)))
    except (ValueError, csv.Error, RecursionError):
        raise ApiError(422, "invalid_metadata", f"{name} is not valid") from None


def _attach_masks(
    images: list[dict[str, Any]], masks: dict[tuple[str, str], dict[str, Any]], skipped: list[dict[str, str]]
) -> None:
    """Give each image its masks (``image["masks"][kind] = sha256``); report the others."""
    by_file = {image["file"]: image for image in images}
    for (kind, file), mask in sorted(masks.items()):
        image = by_file.get(file)
        if image is None:
            skipped.append({"file": mask["file"], "reason": "a mask of no image in the archive"})
        elif (mask["width"], mask["height"]) != (image["width"], image["height"]):
            skipped.append({"file": mask["file"], "reason": f"mask is {mask['width']}x{mask['height']}, "
                                                            f"its image {image['width']}x{image['height']}"})  # fmt: skip
        else:
            image.setdefault("masks", {})[kind] = mask["sha256"]


def _valid_class(name: str) -> bool:
    return 0 < len(name) <= 200 and name.isprintable() and not name.startswith(".")


class DatasetStore:
    """Manifests and content-addressed images under ``settings.data_path``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.data_path
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "datasets"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def blob_path(self, sha: str) -> Path:
        if len(sha) != 64 or not set(sha) <= _ID_CHARS:
            raise ValueError("not a sha256")
        return self.blobs / sha[:2] / f"{sha}.png"

    def _manifest_path(self, dataset_id: str) -> Path | None:
        if not 16 <= len(dataset_id) <= 64 or not set(dataset_id) <= _ID_CHARS:
            return None
        return self.manifests / f"{dataset_id}.json"

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def ingest(self, fileobj: IO[bytes]) -> dict[str, Any]:
        """Validate and store an uploaded archive; return its manifest."""
        budget = _Budget(self.settings)
        images: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        masks: dict[tuple[str, str], dict[str, Any]] = {}
        metadata = None
        with self._locked():
            for member in iter_members(fileobj):
                metadata = self._ingest_member(member, budget, images, skipped, metadata, masks)
            _attach_masks(images, masks, skipped)
            if not images:
                raise ApiError(
                    422,
                    "no_images",
                    f"the archive holds no readable image in a class folder ({len(skipped)} skipped)",
                )
            manifest = self._manifest(images, skipped, metadata)
            path = self._manifest_path(manifest["dataset_id"])
            assert path is not None
            self._write_atomic(path, json.dumps(manifest).encode())
        return manifest

    def _ingest_member(
        self,
        member: _Member,
        budget: _Budget,
        images: list[dict[str, Any]],
        skipped: list[dict[str, str]],
        metadata: Any,
        masks: dict[tuple[str, str], dict[str, Any]],
    ) -> Any:
        budget.count_file()
        path = safe_member_path(member.name)
        parts = [p for p in path.parts if p not in ("", ".")]
        if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
            return metadata
        if parts[0] == MASKS_FOLDER:
            self._ingest_mask(member, parts, budget, skipped, masks)
            return metadata
        if len(parts) == 1 and parts[0] in METADATA_NAMES:
            data = _read_member(member, MAX_METADATA_BYTES, budget)
            if data is None:
                raise ApiError(
                    413, "invalid_metadata", f"{parts[0]} exceeds {MAX_METADATA_BYTES} bytes"
                )
            return _parse_metadata(parts[0], data)
        shown = "/".join(parts)[:300]
        if len(parts) < 2 or not _valid_class(parts[-2]):
            skipped.append({"file": shown, "reason": "not inside a class folder"})
            return metadata
        stored = self._store_image(member, shown, budget, skipped)
        if stored is not None:
            images.append({"class_name": parts[-2], "file": shown, **stored})
        return metadata

    def _store_image(
        self, member: _Member, shown: str, budget: _Budget, skipped: list[dict[str, str]]
    ) -> dict[str, Any] | None:
        """Read, validate and store one image file: its sha256 and size, or None (skipped)."""
        data = _read_member(member, self.settings.max_upload_bytes, budget)
        if data is None:
            skipped.append({"file": shown, "reason": "file exceeds the per-image byte limit"})
            return None
        try:
            canonical = decode_image(data, self.settings.max_image_pixels)
        except ApiError as exc:
            skipped.append({"file": shown, "reason": exc.message})
            return None
        sha = hashlib.sha256(canonical.png).hexdigest()
        target = self.blob_path(sha)
        if not target.exists():
            self._write_atomic(target, canonical.png)
        return {"sha256": sha, "width": canonical.width, "height": canonical.height}

    def _ingest_mask(
        self,
        member: _Member,
        parts: list[str],
        budget: _Budget,
        skipped: list[dict[str, str]],
        masks: dict[tuple[str, str], dict[str, Any]],
    ) -> None:
        shown = "/".join(parts)[:300]
        if len(parts) < 4 or parts[1] not in MASK_KINDS:
            skipped.append({"file": shown, "reason": f"a mask lives in {MASKS_FOLDER}/core/ or {MASKS_FOLDER}/spurious/ "
                                                     "followed by its image's path"})  # fmt: skip
            return
        stored = self._store_image(member, shown, budget, skipped)
        if stored is not None:
            masks[(parts[1], "/".join(parts[2:])[:300])] = {"file": shown, **stored}

    @staticmethod
    def _manifest(
        images: list[dict[str, Any]], skipped: list[dict[str, str]], metadata: Any
    ) -> dict[str, Any]:
        images.sort(key=lambda i: (i["class_name"], i["file"]))
        # masks and metadata only when present, so an upload without them keeps its id; with
        # them in the key, the same images with other votes are another dataset, and an upload
        # never replaces an earlier one's manifest (the same upload again gives the same id)
        entries: list[Any] = [
            [i["class_name"], i["file"], i["sha256"], *([i["masks"]] if "masks" in i else [])] for i in images
        ]
        if metadata is not None:
            entries.append({"metadata": metadata})
        key = json.dumps(entries, sort_keys=True).encode()
        dataset_id = hashlib.sha256(key).hexdigest()[:32]
        classes: dict[str, int] = {}
        for image in images:
            classes[image["class_name"]] = classes.get(image["class_name"], 0) + 1
        manifest = {
            "dataset_id": dataset_id,
            "created_at": datetime.now(UTC).isoformat(),
            "classes": classes,
            "n_images": len(images),
            "masks": {kind: sum(kind in i.get("masks", {}) for i in images) for kind in MASK_KINDS},
            "images": images,
            "skipped": skipped,
            "metadata": metadata,
        }
        return manifest

    def get(self, dataset_id: str) -> dict[str, Any] | None:
        path = self._manifest_path(dataset_id)
        if path is None:
            return None
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def delete(self, dataset_id: str) -> bool:
        path = self._manifest_path(dataset_id)
        if path is None:
            return False
        with self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            self._collect_garbage()
        return True

    def _collect_garbage(self) -> None:
        referenced: set[str] = set()
        for manifest in self.manifests.glob("*.json"):
            try:
                for image in json.loads(manifest.read_text())["images"]:
                    referenced.update([image["sha256"], *image.get("masks", {}).values()])
            except (OSError, ValueError, KeyError):
                continue
        for blob in self.blobs.glob("*/*.png"):
            if blob.stem not in referenced:
                blob.unlink(missing_ok=True)

    def read_image(self, sha: str) -> bytes:
        return self.blob_path(sha).read_bytes()
