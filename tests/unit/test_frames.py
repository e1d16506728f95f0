"""Binary frames: round trips, the JSON fallback, and malformed frames refused with a reason."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from handlers.tasks.common import TaskError, raw_image, request_image
from handlers.torchserve_handler import parse_request
from protocol import contract as c
from protocol.frames import MAGIC, MEDIA_TYPE, FrameError, decode_frame, encode_request, is_frame


def _raw(width: int, height: int, seed: int = 0) -> c.RawImage:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return c.RawImage(width=width, height=height, pixels=pixels.tobytes())


def test_predict_round_trips_through_a_frame_and_the_handler_parser() -> None:
    image = _raw(7, 5)
    body, content_type = encode_request(c.PredictRequest(image=image, top_k=3))
    assert content_type == MEDIA_TYPE and is_frame(body)
    assert len(body) > 7 * 5 * 3  # the pixels themselves, not base64
    parsed = parse_request({"body": bytearray(body)})  # TorchServe hands over a bytearray
    assert isinstance(parsed, c.PredictRequest) and parsed.top_k == 3
    assert isinstance(parsed.image, c.RawImage)
    assert (parsed.image.width, parsed.image.height) == (7, 5)
    assert parsed.image.pixels == image.pixels
    decoded = np.asarray(request_image(parsed.image))
    assert decoded.shape == (5, 7, 3)
    assert np.array_equal(decoded.tobytes(), image.pixels)


def test_image_lists_keep_their_order_and_mix_with_base64() -> None:
    images = [_raw(3, 2, seed=1), "iVBORw0KGgo=", _raw(4, 4, seed=2)]
    body, _ = encode_request(c.EmbedRequest(images=images))
    request = decode_frame(body)
    assert [type(i) for i in request["images"]] == [dict, str, dict]
    parsed = parse_request({"body": body})
    first, _, third = parsed.images  # type: ignore[attr-defined]
    assert first.pixels == images[0].pixels and third.pixels == images[2].pixels
    assert (first.part, third.part) == (0, 1)


def test_requests_without_raw_images_stay_json() -> None:
    body, content_type = encode_request(c.PredictRequest(image="aGVsbG8=", top_k=2))
    assert content_type == "application/json" and not is_frame(body)
    assert body.startswith(b"{")
    assert isinstance(parse_request({"body": body}), c.PredictRequest)


def _frame(header: bytes, parts: list[bytes], lengths: list[int] | None = None) -> bytes:
    lengths = [len(p) for p in parts] if lengths is None else lengths
    prefix = struct.pack(">4sII", MAGIC, len(header), len(lengths))
    return prefix + struct.pack(f">{len(lengths)}Q", *lengths) + header + b"".join(parts)


GOOD_HEADER = b'{"task": "predict", "image": {"width": 1, "height": 1, "part": 0}}'


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (MAGIC + b"\x00", "truncated"),
        (_frame(GOOD_HEADER, [b"abc"], lengths=[4]), "add up"),
        (_frame(GOOD_HEADER, [b"abc", b"def"]), "no image refers"),
        (
            _frame(b'{"task": "predict", "image": {"width": 1, "height": 1, "part": 3}}', [b"abc"]),
            "missing",
        ),
        (_frame(b"[1, 2]", []), "JSON object"),
        (_frame(b"\xff\xfe", []), "not JSON"),
        (_frame(GOOD_HEADER, [b"abc"])[:-1], "add up"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_frame(body)
    with pytest.raises(TaskError) as error:
        parse_request({"body": body})
    assert (error.value.status, error.value.code) == (400, "invalid_frame")
    assert reason in error.value.message


def test_raw_images_are_checked_before_use() -> None:
    good = decode_frame(_frame(GOOD_HEADER, [b"abc"]))
    assert np.asarray(
        request_image(parse_request({"body": _frame(GOOD_HEADER, [b"abc"])}).image)
    ).shape == (1, 1, 3)  # type: ignore[attr-defined]
    assert good["image"]["pixels"] == b"abc"
    short = parse_request({"body": _frame(GOOD_HEADER, [b"ab"])})
    with pytest.raises(TaskError) as error:
        raw_image(short.image)  # type: ignore[attr-defined]
    assert error.value.status == 422 and "width x height" in error.value.message
    # a raw image in plain JSON is a reference without pixels: refused, not crashed
    json_body = b'{"task": "predict", "image": {"width": 1, "height": 1, "part": 0}}'
    with pytest.raises(TaskError) as error:
        raw_image(parse_request({"body": json_body}).image)  # type: ignore[attr-defined]
    assert error.value.status == 422 and "binary frame" in error.value.message
    inline = b'{"task": "predict", "image": {"width": 1, "height": 1, "part": 0, "pixels": "abc"}}'
    with pytest.raises(TaskError) as error:
        parse_request({"body": inline})  # pixels only ever come from a frame
    assert (error.value.status, error.value.code) == (422, "bad_request")
    huge = c.RawImage(width=100_000, height=100_000, pixels=b"")
    with pytest.raises(TaskError) as error:
        raw_image(huge)
    assert error.value.status == 413


def test_the_largest_accepted_image_fits_torchserve_s_request_cap() -> None:
    from protocol.frames import MAX_MESSAGE_MB
    from service.settings import Settings
    from service.torchserve_proxy import MAX_BODY_BYTES

    pixels = Settings.model_fields["max_image_pixels"].default
    side = int(pixels**0.5)
    image = c.RawImage(width=side, height=pixels // side, pixels=bytes(3 * side * (pixels // side)))
    body, _ = encode_request(c.ExplainRequest(image=image, method="lime", params={"n": 1000}))
    assert len(body) <= MAX_MESSAGE_MB * 1024 * 1024 == MAX_BODY_BYTES


def test_deeply_nested_headers_are_refused_not_raised() -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(TaskError) as error:
        parse_request({"body": _frame(nested, [])})
    assert error.value.code == "invalid_frame"
    with pytest.raises(TaskError) as error:
        parse_request({"body": nested})
    assert error.value.code == "invalid_json"
