"""The torchattacks-compatible classes: every setting is an attribute read at each call (set after
construction, it takes effect, as in torchattacks 3.5.1), ``supported_mode`` is honoured, and the
mode and normalisation setters reject bad values."""

import pytest
import torch

import fastrob.attacks as fa

torchattacks = pytest.importorskip("torchattacks")


def mlp():
    torch.manual_seed(0)
    return (
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        .double()
        .eval()
    )


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)


CASES = [  # class, constructor kwargs, attribute, new value
    (fa.PGD, dict(eps=0.03, alpha=0.02, steps=3, random_start=False), "eps", 0.3),
    (fa.PGD, dict(eps=0.1, alpha=0.02, steps=3, random_start=False), "alpha", 0.05),
    (fa.PGD, dict(eps=0.1, alpha=0.02, steps=3, random_start=False), "steps", 7),
    (fa.PGD, dict(eps=0.1, alpha=0.02, steps=3, random_start=False), "random_start", True),
    (fa.PGDL2, dict(eps=0.2, alpha=0.1, steps=3, random_start=False), "eps", 1.5),
    (fa.PGDL2, dict(eps=0.5, alpha=0.1, steps=3, random_start=False), "alpha", 0.3),
    (fa.PGDL2, dict(eps=0.5, alpha=0.1, steps=3, random_start=False), "steps", 6),
    (fa.PGDL2, dict(eps=0.5, alpha=0.1, steps=3, random_start=False), "random_start", True),
    (fa.FGSM, dict(eps=0.05), "eps", 0.2),
]


@pytest.mark.parametrize("cls,kwargs,name,value", CASES, ids=[f"{c[0].__name__}.{c[2]}" for c in CASES])
def test_attribute_set_after_construction_takes_effect(data, cls, kwargs, name, value):
    model, (x, y) = mlp(), data
    attack = cls(model, **kwargs)
    torch.manual_seed(3)
    before = attack(x, y)
    setattr(attack, name, value)
    torch.manual_seed(3)
    after = attack(x, y)
    torch.manual_seed(3)
    fresh = cls(model, **dict(kwargs, **{name: value}))(x, y)
    assert torch.equal(after, fresh)  # the same as constructing with the new value
    assert not torch.equal(after, before)  # and it changed something
    # torchattacks 3.5.1 reads the same attributes at each call: the same result
    reference = getattr(torchattacks, cls.__name__)(model, **kwargs)
    setattr(reference, name, value)
    torch.manual_seed(3)
    torch.testing.assert_close(after, reference(x, y), atol=1e-8, rtol=0)  # L2: torchattacks' eps_for_division


@pytest.mark.parametrize(
    "name,value",
    [
        ("restarts", 3),
        ("loss", "margin"),
        ("robust_only", True),
        ("early_stop", True),
        ("backend", "torch"),
        ("clamp_input", True),
    ],
)
def test_fastrob_extras_are_attributes_too(data, name, value):
    model, (x, y) = mlp(), data
    kwargs = dict(eps=0.2, alpha=0.05, steps=4)
    attack = fa.PGD(model, **kwargs)
    setattr(attack, name, value)
    assert attack.settings()[name] == value
    torch.manual_seed(5)
    after = attack(x, y)
    torch.manual_seed(5)
    assert torch.equal(after, fa.PGD(model, **dict(kwargs, **{name: value}))(x, y))
    assert f"{name}={value}" in repr(attack)


def test_bad_attribute_value_is_named_at_attack_time(data):
    attack = fa.PGD(mlp())
    attack.random_start = 1
    with pytest.raises(ValueError, match="random_start"):
        attack(*data)
    attack = fa.PGDL2(mlp())
    attack.steps = -2
    with pytest.raises(ValueError, match="steps"):
        attack(*data)


@pytest.mark.parametrize(
    "setter", ["set_mode_targeted_by_label", "set_mode_targeted_random", "set_mode_targeted_least_likely"]
)
def test_supported_mode_is_honoured_like_torchattacks(setter):
    for attack in (fa.PGD(mlp()), torchattacks.PGD(mlp())):
        attack.supported_mode = ["default"]
        with pytest.raises(ValueError, match="(?i)targeted mode is not supported"):
            getattr(attack, setter)()
        assert attack.get_mode() == "default"


def test_targeted_mode_reaches_the_target(data):
    model, (x, _) = mlp(), data
    attack = fa.PGD(model, eps=1.0, alpha=0.2, steps=10)
    attack.set_mode_targeted_by_label()
    target = torch.full((16,), 2)
    with torch.no_grad():
        assert (model(attack(x, target)).argmax(1) == 2).float().mean() > 0.9


def test_least_likely_rank_beyond_the_classes_is_a_clear_error(data):
    attack = fa.PGD(mlp())
    attack.set_mode_targeted_least_likely(kth_min=5)  # 5 classes: at most 4 others
    with pytest.raises(ValueError, match="kth_min must be at most the number of classes - 1 = 4"):
        attack(*data)
    with pytest.raises(ValueError, match="kth_min"):
        attack.set_mode_targeted_least_likely(kth_min=0)


@pytest.mark.parametrize("std", [[0.0], [-0.5], [float("nan")], [float("inf")]])
def test_normalization_std_must_be_positive_and_finite(std):
    with pytest.raises(ValueError, match="std must be positive and finite"):
        fa.PGD(mlp()).set_normalization_used([0.5], std)


def test_normalization_equals_a_normalized_model(data):
    model, (x, y) = mlp(), data
    attack = fa.PGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False)
    attack.set_normalization_used([0.4], [0.3])

    class Normalized(torch.nn.Module):
        def forward(self, inp):
            return model((inp - 0.4) / 0.3)

    expected = fa.PGD(Normalized(), eps=0.1, alpha=0.03, steps=3, random_start=False)(x, y)
    torch.testing.assert_close(attack(x, y), expected, atol=1e-12, rtol=0)
