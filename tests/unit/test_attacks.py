"""Attacks: registry, invariants, a float64 reference loop, torchattacks parity, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from handlers.attacks import NEVER, available_attacks, get_attack
from protocol.validation import ClassOutOfRange, InvalidParameter, UnknownMethod
from tests.unit.adversarial_helpers import assert_unchanged, images, snapshot, tiny_cnn

SETTINGS = {
    "fgsm": [{"epsilon": 0.02}, {"epsilon": 0.3, "norm": "l2"}],
    "ifgsm": [{"step_size": 0.004, "steps": 6}, {"step_size": 0.05, "steps": 5, "epsilon": 0.12, "norm": "l2"}],
    "pgd": [{"epsilon": 0.03, "step_size": 0.01, "steps": 5}, {"epsilon": 0.3, "step_size": 0.1, "steps": 4, "norm": "l2"}],
}


def _norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def test_every_registered_attack_has_settings_here() -> None:
    assert set(available_attacks()) == set(SETTINGS)


@pytest.mark.parametrize("name", available_attacks())
@pytest.mark.parametrize("setting", [0, 1])
def test_invariants_of_every_attack(name: str, setting: int) -> None:
    """Pixels in [0, 1], perturbation within budget, loss not decreased, model untouched."""
    params = {**SETTINGS[name][setting], "stop_at_flip": False}
    model, x = tiny_cnn(), images(6)
    before = snapshot(model)
    result = get_attack(name, params)(model, x)
    assert_unchanged(model, before)
    adv = result.adversarial
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    norm = params.get("norm", "linf")
    budget = params.get("epsilon", params.get("step_size", 0) * params.get("steps", 1))
    assert torch.all(_norm(adv - x, norm) <= budget + 1e-9)
    assert torch.allclose(result.linf, _norm(adv - x, "linf")) and torch.allclose(result.l2, _norm(adv - x, "l2"))
    with torch.no_grad():
        labels = model(x).argmax(1)
        assert torch.all(F.cross_entropy(model(adv), labels, reduction="none") >= F.cross_entropy(model(x), labels, reduction="none") - 1e-9)


def _reference(model, x, reference, alpha, steps, eps, norm, targeted):  # noqa: ANN001, ANN202
    """Plain per-image float64 loop of [Stock2018, eq. 2] with stop-at-success."""
    out, flips = [], []
    for i in range(x.shape[0]):
        x0, xa, flip = x[i : i + 1], x[i : i + 1].clone(), NEVER
        for t in range(steps + 1):
            xa.requires_grad_(True)
            logits = model(xa)
            hit = (logits.argmax(1) == reference[i]) if targeted else (logits.argmax(1) != reference[i])
            if hit.item():
                flip = t
                break
            if t == steps:
                break
            loss = F.cross_entropy(logits, reference[i : i + 1])
            (g,) = torch.autograd.grad(-loss if targeted else loss, xa)
            d = g.sign() if norm == "linf" else g / g.norm()
            moved = xa.detach() + alpha * d
            delta = moved - x0
            if eps is not None:
                delta = delta.clamp(-eps, eps) if norm == "linf" else delta * min(1.0, eps / delta.norm().item())
            xa = (x0 + delta).clamp(0, 1).detach()
        out.append(xa.detach())
        flips.append(flip)
    return torch.cat(out), torch.tensor(flips)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_ifgsm_equals_plain_reference_loop(norm: str, targeted: bool) -> None:
    model, x = tiny_cnn(seed=1), images(8, seed=1)
    alpha, eps = (0.001, 0.006) if norm == "linf" else (0.015, 0.1)
    targets = torch.arange(8) % 4
    params = {"step_size": alpha, "steps": 12, "epsilon": eps, "norm": norm}
    result = get_attack("ifgsm", params)(model, x, targets=targets if targeted else None)
    with torch.no_grad():
        reference = targets if targeted else model(x).argmax(1)
    adv, flips = _reference(model, x, reference, alpha, 12, eps, norm, targeted)
    assert torch.equal(result.steps_to_flip, flips)
    assert torch.allclose(result.adversarial, adv, atol=1e-12)
    assert (result.steps_to_flip != NEVER).any() and (result.steps_to_flip == NEVER).any()
    assert torch.equal(result.success, result.steps_to_flip != NEVER)
    if targeted:  # success means the target was reached
        assert torch.equal(result.predictions[result.success], targets[result.success])


def test_batch_equals_per_sample() -> None:
    model, x = tiny_cnn(seed=2), images(5, seed=2)
    attack = get_attack("ifgsm", {"step_size": 0.01, "steps": 8})
    whole = attack(model, x)
    for i in range(5):
        single = attack(model, x[i : i + 1])
        assert torch.allclose(single.adversarial[0], whole.adversarial[i], atol=1e-12)
        assert single.steps_to_flip[0] == whole.steps_to_flip[i]


def test_misclassified_images_take_zero_steps() -> None:
    model, x = tiny_cnn(), images(4)
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 4
    result = get_attack("ifgsm")(model, x, labels=wrong)
    assert result.steps_to_flip.tolist() == [0, 0, 0, 0]
    assert torch.equal(result.adversarial, x) and result.steps_to_flip_list() == [0, 0, 0, 0]


def _torchattacks(name: str, model, params: dict):  # noqa: ANN001, ANN202
    if name == "fgsm":
        return torchattacks.FGSM(model, eps=params["epsilon"])
    if name == "ifgsm":
        return torchattacks.BIM(model, eps=params["epsilon"], alpha=params["step_size"], steps=params["steps"])
    if params.get("norm") == "l2":
        return torchattacks.PGDL2(model, eps=params["epsilon"], alpha=params["step_size"], steps=params["steps"], random_start=False)
    return torchattacks.PGD(model, eps=params["epsilon"], alpha=params["step_size"], steps=params["steps"], random_start=False)


PARITY = [
    ("fgsm", {"epsilon": 0.02}),
    ("ifgsm", {"epsilon": 0.03, "step_size": 0.005, "steps": 10}),
    ("pgd", {"epsilon": 0.03, "step_size": 0.01, "steps": 6, "random_start": False}),
    ("pgd", {"epsilon": 0.5, "step_size": 0.1, "steps": 6, "random_start": False, "norm": "l2"}),
]


@pytest.mark.parametrize(("name", "params"), PARITY)
@pytest.mark.parametrize("targeted", [False, True])
def test_matches_torchattacks(name: str, params: dict, targeted: bool) -> None:
    """Same steps, no random start, no early stop: identical to torchattacks to 1e-5."""
    model, x = tiny_cnn(dtype=torch.float32, seed=3), images(6, seed=3, dtype=torch.float32)
    with torch.no_grad():
        labels = model(x).argmax(1)
    targets = (labels + 1) % 4
    reference = _torchattacks(name, model, params)
    if targeted:
        reference.set_mode_targeted_by_label(quiet=True)
    expected = reference(x, targets if targeted else labels)
    ours = get_attack(name, {**params, "stop_at_flip": False})(model, x, targets=targets if targeted else None)
    assert (ours.adversarial - expected).abs().max() <= 1e-5


def test_pgd_random_start_is_seeded_and_within_budget() -> None:
    model, x = tiny_cnn(), images(4)
    params = {"epsilon": 0.05, "step_size": 0.01, "steps": 2, "stop_at_flip": False}
    a = get_attack("pgd", {**params, "seed": 7})(model, x)
    b = get_attack("pgd", {**params, "seed": 7})(model, x)
    c = get_attack("pgd", {**params, "seed": 8})(model, x)
    assert torch.equal(a.adversarial, b.adversarial) and not torch.equal(a.adversarial, c.adversarial)
    assert a.linf.max() <= 0.05 + 1e-12
    no_start = get_attack("pgd", {**params, "random_start": False})(model, x)
    same = get_attack("ifgsm", params)(model, x)
    assert torch.equal(no_start.adversarial, same.adversarial)


def test_train_mode_model_is_attacked_in_eval_mode_and_restored() -> None:
    model, x = tiny_cnn(), images(3)
    model.train()
    before = snapshot(model)
    eval_result = get_attack("ifgsm")(model.eval(), x)
    model.train()
    train_result = get_attack("ifgsm")(model, x)
    assert_unchanged(model, before, training=True)
    assert torch.equal(eval_result.adversarial, train_result.adversarial)


def test_model_restored_after_an_exception() -> None:
    model = tiny_cnn().train()
    with pytest.raises(InvalidParameter):
        get_attack("ifgsm")(model, images(2), labels=torch.tensor([0, 9]))
    assert model.training


@pytest.mark.parametrize(
    ("name", "params", "param"),
    [
        ("ifgsm", {"step_size": -1}, "step_size"),
        ("ifgsm", {"steps": 0}, "steps"),
        ("ifgsm", {"norm": "l3"}, "norm"),
        ("ifgsm", {"epsilon": 2.0}, "epsilon"),
        ("fgsm", {"eps": 0.1}, "eps"),  # the old name of epsilon is refused, not ignored
        ("pgd", {"seed": -3}, "seed"),
        ("pgd", {"target_class": -1}, "target_class"),
    ],
)
def test_bad_parameters_name_the_parameter(name: str, params: dict, param: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        get_attack(name, params)
    assert info.value.param == param and info.value.reason


def test_bad_call_arguments() -> None:
    model = tiny_cnn()
    with pytest.raises(ClassOutOfRange, match="target_class: class 4 is out of range"):
        get_attack("ifgsm", {"target_class": 4})(model, images(2))
    with pytest.raises(InvalidParameter, match="images"):
        get_attack("ifgsm")(model, images(2) * 3)
    with pytest.raises(InvalidParameter, match="images"):
        get_attack("ifgsm")(model, torch.rand(2, 8, 8))
    with pytest.raises(InvalidParameter, match="at least one image"):
        get_attack("ifgsm")(model, images(2)[:0])


def test_unknown_attack() -> None:
    with pytest.raises(UnknownMethod, match="ifgsm"):
        get_attack("deepfool")


def test_works_under_an_outer_inference_mode() -> None:
    """A model server may wrap every request in ``torch.inference_mode``."""
    model, x = tiny_cnn(), images(3)
    expected = get_attack("ifgsm", {"step_size": 0.01})(model, x)
    with torch.inference_mode():
        inside = get_attack("ifgsm", {"step_size": 0.01})(model, images(3))
    assert torch.equal(inside.adversarial, expected.adversarial)
    assert torch.equal(inside.steps_to_flip, expected.steps_to_flip)


def test_in_batches_equals_one_call() -> None:
    model, x = tiny_cnn(seed=2), images(7, seed=2)
    labels = torch.arange(7) % 4
    attack = get_attack("ifgsm", {"step_size": 0.01, "steps": 8})
    whole, chunked = attack(model, x, labels), attack.in_batches(model, x, labels, batch_size=3)
    for name, value in vars(whole).items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(getattr(chunked, name).double(), value.double(), atol=1e-12), name


@pytest.mark.parametrize("targeted", [False, True])
def test_masked_loop_of_accelerators_equals_the_compact_cpu_loop(targeted: bool, monkeypatch) -> None:  # noqa: ANN001
    """On a GPU stopped images stay in the batch, frozen by a mask; same results."""
    import handlers.attacks.base as base

    model, x = tiny_cnn(seed=1), images(8, seed=1)
    targets = torch.arange(8) % 4 if targeted else None
    params = {"step_size": 0.004, "steps": 12, "epsilon": 0.03} if targeted else {"step_size": 0.001, "steps": 12, "epsilon": 0.006}
    attack = get_attack("ifgsm", params)
    compact = attack(model, x, targets=targets)
    monkeypatch.setattr(base, "compacts", lambda device: False)
    masked = attack(model, x, targets=targets)
    assert torch.equal(masked.steps_to_flip, compact.steps_to_flip)
    assert torch.allclose(masked.adversarial, compact.adversarial, atol=1e-12)
    assert torch.equal(masked.predictions, compact.predictions)
    assert (compact.steps_to_flip > 0).any()


def test_the_torch_free_parameter_table_is_the_registrys() -> None:
    from handlers.attacks import available_attacks, get_attack
    from protocol.params.attacks import PARAMS_BY_ATTACK

    assert sorted(PARAMS_BY_ATTACK) == available_attacks()
    for name, model in PARAMS_BY_ATTACK.items():
        assert get_attack(name).params_model is model
