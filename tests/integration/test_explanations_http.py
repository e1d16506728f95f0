"""Explain, attack and APEM over real HTTP on demo images whose answers we know."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def star(shapes_split) -> tuple[bytes, np.ndarray]:
    """A test star (class 3) as PNG bytes, with its core mask."""
    split = shapes_split("spurious", "test")
    i = next(i for i, a in enumerate(split.attributes) if a["class_name"] == "star")
    out = io.BytesIO()
    Image.fromarray(split.images[i]).save(out, format="PNG")
    return out.getvalue(), split.core_masks[i]


def _files(data: bytes) -> dict:
    return {"image": ("star.png", data, "image/png")}


def _npy(body: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(body["data"])), allow_pickle=False)


@pytest.mark.parametrize("method", ["gradient", "smoothgrad", "integrated_gradients", "lrp", "lime", "gradcam", "nam", "sis"])
def test_every_method_explains_the_predicted_class(api: httpx.Client, star, method: str) -> None:
    image, core = star
    params = {"n": 300} if method == "lime" else {}
    reply = api.post(f"/v1/models/{MODEL}/explain", files=_files(image),
                     data={"method": method, "params": json.dumps(params)})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == MODEL and body["method"] == method and body["stage"] == 2
    assert body["prediction"]["label"] == "star" and body["target"] == 3  # default: predicted class
    relevance = _npy(body["relevance"])
    assert relevance.shape == (64, 64) and body["relevance"]["shape"] == [64, 64]
    assert 0.0 <= relevance.min() and relevance.max() <= 1.0 and relevance.max() > 0
    assert base64.b64decode(body["heatmap_png"]).startswith(PNG)
    assert base64.b64decode(body["overlay_png"]).startswith(PNG)
    # every method returns the parameters it used, defaults included
    if method == "lime":
        assert body["params"]["n"] == 300 and body["params"]["kernel_width"] == 0.25
    if method == "smoothgrad":
        assert body["params"]["n"] == 100 and body["params"]["sigma"] == 0.2  # thesis defaults


def test_lrp_relevance_lies_on_the_star(api: httpx.Client, star) -> None:
    image, core = star
    reply = api.post(f"/v1/models/{MODEL}/explain", files=_files(image), data={"method": "lrp"})
    relevance = _npy(reply.json()["relevance"])
    share = relevance[core].sum() / relevance.sum()
    assert share > 2 * core.mean(), (share, core.mean())


def test_explain_other_target_stage_and_apem_score(api: httpx.Client, star) -> None:
    image, _ = star
    reply = api.post(f"/v1/models/{MODEL}/explain", files=_files(image),
                     data={"method": "gradient", "target": "0", "stage": "3", "score": "apem"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["target"] == 0 and body["stage"] == 3 and body["prediction"]["label"] == "star"
    apem = body["apem"]
    assert apem["grid"]["step"] == 1.0 and apem["approximate"] is False
    assert apem["eps_minus"] is None or apem["eps_minus"] > 0


def test_attack_flips_within_budget_and_targeted_reaches_target(api: httpx.Client, star) -> None:
    image, _ = star
    reply = api.post(f"/v1/models/{MODEL}/attack", files=_files(image),
                     data={"method": "ifgsm", "params": json.dumps({"step_size": 0.008, "steps": 10})})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["original"]["label"] == "star"
    assert body["success"] and body["adversarial"]["label"] != "star"
    assert 1 <= body["steps_to_flip"] <= 10 and body["linf"] <= 0.08 + 1e-6
    assert base64.b64decode(body["adversarial_png"]).startswith(PNG)
    assert base64.b64decode(body["perturbation_png"]).startswith(PNG)
    targeted = api.post(f"/v1/models/{MODEL}/attack", files=_files(image),
                        data={"method": "pgd", "params": json.dumps(
                            {"epsilon": 0.1, "step_size": 0.01, "steps": 40, "target_class": 0})}).json()
    assert targeted["success"] and targeted["adversarial"]["class_index"] == 0
    assert targeted["linf"] <= 0.1 + 1e-6


@pytest.mark.parametrize("method", ["fgsm", "ifgsm", "pgd"])
def test_every_attack_runs_with_its_own_defaults(api: httpx.Client, star, method: str) -> None:
    """No params: the method's defaults (FGSM takes no ``steps``; I-FGSM is [Stock2018, §3.2]'s)."""
    image, _ = star
    reply = api.post(f"/v1/models/{MODEL}/attack", files=_files(image), data={"method": method})
    assert reply.status_code == 200, reply.text
    params = reply.json()["params"]
    expected = {"fgsm": {"epsilon": 0.01}, "ifgsm": {"step_size": 0.001, "steps": 10},
                "pgd": {"epsilon": 8 / 255, "step_size": 2 / 255, "steps": 10}}[method]
    assert {k: params[k] for k in expected} == pytest.approx(expected)
    if method == "fgsm":
        assert "steps" not in params


def test_apem_from_method_and_from_uploaded_map(api: httpx.Client, star) -> None:
    image, core = star
    by_method = api.post(f"/v1/models/{MODEL}/apem", files=_files(image), data={"method": "gradient"})
    assert by_method.status_code == 200, by_method.text
    assert by_method.json()["grid"]["max_steps"] > 0
    on_core = io.BytesIO()
    np.save(on_core, core.astype(np.float32))
    reply = api.post(f"/v1/models/{MODEL}/apem",
                     files={**_files(image), "relevance": ("r.npy", on_core.getvalue(), "application/octet-stream")})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["eps_minus"] is not None and body["apem"] is not None
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((32, 32), np.float32))
    refused = api.post(f"/v1/models/{MODEL}/apem",
                       files={**_files(image), "relevance": ("r.npy", wrong.getvalue(), "application/octet-stream")})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_relevance"


def test_apem_grid_and_norm_are_the_clients_to_set(api: httpx.Client, star) -> None:
    """`apem_params` reaches the search: a grid ending just below eps- no longer finds it."""
    image, _ = star
    url = f"/v1/models/{MODEL}/apem"
    default = api.post(url, files=_files(image), data={"method": "gradient"}).json()
    found = int(default["eps_minus"])
    assert default["params"]["max_steps"] == 2000 and default["params"]["search"] == "exact"
    for max_steps, expected in ((found, found), (found - 1, None)):
        reply = api.post(url, files=_files(image),
                         data={"method": "gradient", "apem_params": json.dumps({"max_steps": max_steps})})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["eps_minus"] == expected and body["grid"]["cap"] == max_steps + 1
        assert body["params"]["max_steps"] == max_steps
    normed = api.post(url, files=_files(image), data={
        "method": "smoothgrad", "params": json.dumps({"n": 8}),
        "apem_params": json.dumps({"normalise": True, "shuffles": 3, "max_steps": 500}),
    })
    assert normed.status_code == 200, normed.text
    body = normed.json()
    assert body["apem_norm"] is not None and np.isfinite(body["apem_norm"])
    assert body["params"]["normalise"] is True and body["params"]["shuffles"] == 3
    assert body["method_params"]["n"] == 8 and body["method_params"]["sigma"] == 0.2
    scored = api.post(f"/v1/models/{MODEL}/explain", files=_files(image), data={
        "method": "gradient", "score": "apem", "apem_params": json.dumps({"max_steps": found - 1}),
    }).json()["apem"]
    assert scored["eps_minus"] is None and scored["params"]["max_steps"] == found - 1
    refused = api.post(url, files=_files(image), data={"method": "gradient", "apem_params": '{"steps": 5}'})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_params"
    assert "apem_params.steps" in refused.json()["error"]["message"]


def test_attack_returns_the_exact_image_its_png_prediction_and_its_explanation(api: httpx.Client, star) -> None:
    """[Stock2018, fig. 5]: the adversarial image explained for its new class."""
    image, _ = star
    reply = api.post(f"/v1/models/{MODEL}/attack", files=_files(image), data={
        "method": "ifgsm", "params": json.dumps({"step_size": 0.008}),
        "explain": "gradient", "adversarial_array": "true",
    })
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["success"]
    clean = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    exact = _npy(body["adversarial_array"])
    assert exact.shape == (3, 64, 64) and exact.dtype == np.float32
    assert np.abs(exact - clean).max() == pytest.approx(body["linf"], abs=1e-6)
    delivered = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["adversarial_png"]))), dtype=np.float32)
    assert np.array_equal(delivered, np.round(exact.transpose(1, 2, 0) * 255))
    again = api.post(f"/v1/models/{MODEL}/predict", params={"top_k": 1},
                     files={"image": ("adv.png", base64.b64decode(body["adversarial_png"]), "image/png")})
    assert again.json()["predictions"][0]["class_index"] == body["png_prediction"]["class_index"]
    assert again.json()["predictions"][0]["probability"] == pytest.approx(body["png_prediction"]["probability"], abs=1e-5)
    explanation = body["explanation"]
    assert explanation["method"] == "gradient" and explanation["target"] == body["adversarial"]["class_index"]
    assert explanation["prediction"]["class_index"] == body["adversarial"]["class_index"]
    relevance = _npy(explanation["relevance"])
    assert relevance.shape == (64, 64) and relevance.max() > 0
    assert base64.b64decode(explanation["heatmap_png"]).startswith(PNG)


def test_sis_subset_picture_and_numbers(api: httpx.Client, star) -> None:
    """[Carter2021]: the sufficient subset, shown alone, and the confidence with 95 % masked."""
    image, _ = star
    reply = api.post(f"/v1/models/{MODEL}/explain", files=_files(image), data={
        "method": "sis", "params": json.dumps({"keep_fraction": 0.1}), "outputs": "attention_png",
    })
    assert reply.status_code == 200, reply.text
    body = reply.json()
    extras = body["extras"]
    assert body["params"]["threshold"] == 0.9 and body["params"]["keep_fraction"] == 0.1
    subset = _npy(extras["sis_mask"]).astype(bool)
    assert subset.shape == (64, 64) and subset.mean() == pytest.approx(extras["sis_fraction"])
    assert extras["sis_confidence"] >= 0.9 and extras["kept_fraction"] == pytest.approx(0.1, abs=1 / 4096)
    assert extras["confident_when_kept"] == (
        extras["kept_prediction"] == 3 and extras["kept_confidence"] >= 0.9
    )
    assert extras["shown_fraction"][0] == 1.0 and len(extras["confidence"]) == len(extras["shown_fraction"])
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["attention_png"]))).convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    assert np.array_equal(shown[subset], original[subset]) and not shown[~subset].any()
    refused = api.post(f"/v1/models/{MODEL}/explain", files=_files(image),
                       data={"method": "sis", "params": json.dumps({"mask_value": 2})})
    assert refused.status_code == 422 and "mask_value" in refused.text


def test_lime_pictures_and_numbers_on_request(api: httpx.Client, star) -> None:
    """[Stock2018, fig. 12]: LIME's attention image and explanation path, and its fit."""
    image, _ = star
    reply = api.post(f"/v1/models/{MODEL}/explain", files=_files(image), data={
        "method": "lime", "params": json.dumps({"n": 300}),
        "outputs": "attention_png,path_png,relevance", "colormap": "viridis",
    })
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["heatmap_png"] is None and body["overlay_png"] is None
    for name in ("attention_png", "path_png"):
        assert base64.b64decode(body[name]).startswith(PNG)
    extras = body["extras"]
    segments = _npy(extras["segments"])
    assert segments.shape == (64, 64) and int(segments.max()) + 1 == extras["num_superpixels"]
    assert len(extras["weights"]) == extras["num_superpixels"]
    relevance = _npy(body["relevance"])
    best = int(np.argmax(extras["weights"]))  # the top superpixel holds the map's largest values
    assert relevance[segments == best].mean() > relevance.mean()
    refused = api.post(f"/v1/models/{MODEL}/explain", files=_files(image),
                       data={"method": "gradient", "colormap": "no-such-map"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "bad_parameter"
