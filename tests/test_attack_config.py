"""The one attack configuration (fastrob.attacks.config): every bad value is named in its error,
random starts are compared by identity (1 and 0.0 are not starts), and the default step rule."""

import math

import pytest
import torch

import fastrob.attacks as fa
from fastrob.attacks.config import AttackConfig, check_loss, check_norm, check_random_start, default_alpha


@pytest.mark.parametrize(
    "field,value",
    [
        ("eps", -0.1),
        ("eps", float("nan")),
        ("eps", "0.1"),
        ("eps", float("inf")),
        ("alpha", -1.0),
        ("alpha", float("nan")),
        ("steps", -1),
        ("steps", 1.5),
        ("steps", True),
        ("norm", "l1"),
        ("norm", None),
        ("norm", "Linf"),
        ("random_start", 1),
        ("random_start", 0.0),
        ("random_start", "gauss"),
        ("random_start", None),
        ("restarts", 0),
        ("restarts", 2.0),
        ("loss", "dlr2"),
        ("loss", 3),
    ],
)
def test_every_bad_value_is_named(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        AttackConfig(**{field: value})


def test_good_values_and_the_default_step_rule():
    c = AttackConfig(eps=0.3, steps=12, norm="l2", random_start="normal", restarts=2, loss="margin")
    assert c.step_size == 2.5 * 0.3 / 12 == default_alpha(0.3, 12)
    assert AttackConfig(eps=0.3, alpha=0.01).step_size == 0.01
    assert AttackConfig(eps=0.2, steps=0).step_size == 2.5 * 0.2  # steps 0 counts as 1
    assert AttackConfig(loss=lambda z, y: z[:, 0]).loss is not None
    kw = c.pgd_kwargs()
    assert kw == dict(
        eps=0.3, alpha=2.5 * 0.3 / 12, steps=12, norm="l2", random_start="normal", restarts=2, loss="margin"
    )


def test_scaled_keeps_the_rule_and_a_given_alpha_ratio():
    assert AttackConfig(eps=0.4, steps=4).scaled(0.5).step_size == 2.5 * 0.2 / 4
    s = AttackConfig(eps=0.4, alpha=0.1, steps=4).scaled(0.5)
    assert (s.eps, s.step_size) == (0.2, 0.05)


def test_default_alpha_takes_per_sample_tensors():
    eps = torch.tensor([0.0, 0.1, 0.4])
    torch.testing.assert_close(default_alpha(eps, 10), 2.5 * eps / 10)
    assert math.isclose(default_alpha(0.3, 6, factor=1.0), 0.05)


def test_random_start_by_identity():
    for good in (True, False, "uniform", "normal", "trades"):
        assert check_random_start(good) is good
    for bad in (1, 0, 1.0, 0.0, "True", torch.tensor(True)):
        with pytest.raises(ValueError, match="random_start"):
            check_random_start(bad)
    with pytest.raises(ValueError, match="random_start"):
        check_random_start("trades", (True, False, "uniform", "normal"))


def test_norm_and_loss_checks():
    assert check_norm("linf") == "linf" and check_norm("l2") == "l2"
    with pytest.raises(ValueError, match="attack_norm"):
        check_norm("l1", "attack_norm")
    with pytest.raises(ValueError, match="loss"):
        check_loss("hinge")


def test_pgd_and_the_regularizers_use_the_same_checks():
    from fastrob.regularizers.interpretation import InterpretationRegularizer
    from fastrob.regularizers.sns import SNSRegularizer

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="random_start"):
        fa.pgd(model, x, y, random_start=1)  # 1 == True, but it is not the start True
    with pytest.raises(ValueError, match="norm must be one of"):
        fa.pgd(model, x, y, norm="l1")
    with pytest.raises(ValueError, match="norm must be one of"):
        SNSRegularizer(norm="l1")
    with pytest.raises(ValueError, match="random_start"):
        InterpretationRegularizer("int2", random_start=0.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        fa.isa(model, x, y, norm="linf2")


def test_the_evaluation_attacks_share_one_norm_check():
    from fastrob.attacks.config import torchattacks_norm

    assert [torchattacks_norm(n) for n in ("Linf", "linf", "L2", "l2")] == ["linf", "linf", "l2", "l2"]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 5))
    for bad in ("LINF", "L1", None):
        with pytest.raises(ValueError, match=r"norm must be 'Linf' or 'L2'"):
            torchattacks_norm(bad)
        for build in (
            lambda: fa.APGD(model, norm=bad),
            lambda: fa.APGDT(model, norm=bad, n_classes=5),
            lambda: fa.FAB(model, norm=bad),
            lambda: fa.Square(model, norm=bad),
            lambda: fa.AutoAttack(model, norm=bad, n_classes=5),
        ):
            with pytest.raises(ValueError, match=r"norm must be 'Linf' or 'L2'"):
                build()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_sphere_start_lies_on_the_sphere(norm):
    from fastrob.attacks.starts import make_generator, sphere_start

    x = torch.full((6, 3, 4, 4), 0.5, dtype=torch.float64)
    radius = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.1, 0.2], dtype=torch.float64)
    if norm == "l2":
        radius = radius * 2  # each pixel moves far less than 0.5: no clamp
    delta = (sphere_start(x, radius, norm, make_generator(0, "cpu")) - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert torch.allclose(size, radius, atol=1e-12)
    again = sphere_start(x, radius, norm, make_generator(0, "cpu"))
    assert torch.equal(again - x, delta.view_as(x))  # the seed decides the start


def test_make_generator_checks_the_seed():
    from fastrob.attacks.starts import make_generator

    with pytest.raises((TypeError, ValueError), match="seed"):
        make_generator(-1, "cpu")
    with pytest.raises((TypeError, ValueError), match="seed"):
        make_generator(1.5, "cpu")
    a = torch.rand(3, generator=make_generator(7, "cpu"))
    assert torch.equal(a, torch.rand(3, generator=make_generator(7.0, "cpu")))
