"""APGD / APGD-T: the step-size schedule, the DLR losses, parity with torchattacks 3.5.1, state,
attributes and input checks."""

import sys
from fractions import Fraction
from math import ceil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.autoattack import digits_models  # noqa: E402
from fastrob.attacks import APGD, APGDT, apgd, dlr_loss, targeted_dlr_loss  # noqa: E402
from fastrob.attacks.apgd import apgd_checkpoints, halving_mask  # noqa: E402

EPS = 0.1


def robust_count(model, x_adv, y):
    with torch.no_grad():
        return int((model(x_adv).argmax(1) == y).sum())


def allowed(n, points=0.5):
    """The acceptance margin (0.5 point of n samples); at least one sample in the small default runs."""
    return max(int(points / 100 * n), 1)


def inside(x_adv, x, eps, norm="Linf"):
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    in_box = bool(x_adv.min() >= 0) and bool(x_adv.max() <= 1)
    return bool((size <= eps + 1e-5).all()) and in_box and bool(torch.isfinite(x_adv).all())


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one intra-op thread is many times faster."""


@pytest.fixture(scope="module")
def three_models(digits):
    return digits_models(digits)


# ---------------------------------------------------------------------------------------------- schedule


def reference_checkpoints(n):
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return sorted({ceil(q * n) for q in p if ceil(q * n) <= n})


@pytest.mark.parametrize("n", [100, 10, 37, 1000])
def test_checkpoints(n):
    assert apgd_checkpoints(n) == reference_checkpoints(n)
    if n == 100:
        assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


def test_halving_rule():
    increases = torch.tensor([5, 20, 16, 17, 20])
    halved_last = torch.tensor([True, True, True, True, False])
    best = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    best_last = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    # 0.75·22 = 16.5: 5 and 16 increases oscillate; 20 with no gain and no halving last time stalls
    assert halving_mask(increases, 22, 0.75, halved_last, best, best_last).tolist() == [True, False, True, False, True]


class _Linear(nn.Module):
    """z_0 = w·x - 10, z_k = 0: the CE of label 1 grows with w·x, its gradient has sign(w) everywhere,
    the model never misclassifies within the ball, and the maximiser is clamp(x + eps·sign(w))."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        z0 = x.flatten(1) @ self.w - 10
        return torch.cat([z0[:, None], torch.zeros(len(x), 4)], 1)


def test_schedule_on_a_linear_model():
    torch.manual_seed(0)
    w = torch.randn(16)
    model = _Linear(w)
    x = torch.rand(3, 1, 4, 4)
    y = torch.ones(3, dtype=torch.long)
    trace = []
    out = apgd(model, x, y, eps=EPS, steps=100, _trace=trace)
    expected = torch.clamp(x + EPS * w.view(1, 1, 4, 4).sign(), 0, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    # After the first step the loss never rises again, so every checkpoint halves η (condition 1).
    eta = torch.stack(trace)[:, 0]
    marks = [0, 22, 41, 57, 70, 80, 87, 93, 99]
    for j in range(len(marks) - 1):
        segment = eta[marks[j] : marks[j + 1]]
        assert torch.allclose(segment, torch.full_like(segment, 2 * EPS / 2**j)), j
    assert torch.allclose(eta[99], torch.tensor(2 * EPS / 2**8))


# ---------------------------------------------------------------------------------------------- DLR


def test_dlr_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    y0, y1 = torch.tensor([0]), torch.tensor([1])
    assert torch.allclose(dlr_loss(z, y0), torch.tensor([-2 / 3]))  # -(3 - 1) / (3 - 0)
    assert torch.allclose(dlr_loss(z, y1), torch.tensor([2 / 3]))  # misclassified: > 0
    assert torch.allclose(targeted_dlr_loss(z, y0, torch.tensor([2])), torch.tensor([-3 / 3.5]))
    # invariant to shift and positive scale
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    targets = (labels + 3) % 10
    assert torch.allclose(dlr_loss(5 * logits + 2, labels), dlr_loss(logits, labels), atol=1e-5)
    scaled = targeted_dlr_loss(5 * logits - 1, labels, targets)
    assert torch.allclose(scaled, targeted_dlr_loss(logits, labels, targets), atol=1e-5)
    assert ((dlr_loss(logits, labels) > 0) == (logits.argmax(1) != labels)).all()


# ---------------------------------------------------------------------------------------------- parity


def _parity(model, x, y, ours, theirs, eps, norm="Linf"):
    a, b = ours(x, y), theirs(x, y)
    assert inside(a, x, eps, norm)
    ra, rb = robust_count(model, a, y), robust_count(model, b, y)
    assert ra <= rb + allowed(len(y)), (ra, rb)
    return ra, rb


@pytest.mark.parametrize("kind", ["ce", "dlr", "t", "l2"])
def test_parity_small(plain, digits, kind):
    import torchattacks

    x, y = digits.x_test[:64], digits.y_test[:64]
    norm, eps = ("L2", 0.5) if kind == "l2" else ("Linf", EPS)
    if kind == "t":
        ours, theirs = APGDT(plain, eps=eps, steps=10), torchattacks.APGDT(plain, eps=eps, steps=10)
    else:
        loss = "dlr" if kind == "dlr" else "ce"
        ours = APGD(plain, norm=norm, eps=eps, steps=20, loss=loss)
        theirs = torchattacks.APGD(plain, norm=norm, eps=eps, steps=20, loss=loss)
    _parity(plain, x, y, ours, theirs, eps, norm)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "pgd", "gradpen"])
@pytest.mark.parametrize("kind", ["ce", "t"])
def test_parity_full(three_models, digits, name, kind):
    import torchattacks

    model = three_models[name]
    x, y = digits.x_test, digits.y_test
    if kind == "t":
        ours, theirs = APGDT(model, eps=EPS, steps=100), torchattacks.APGDT(model, eps=EPS, steps=100)
    else:
        ours, theirs = APGD(model, eps=EPS, steps=100), torchattacks.APGD(model, eps=EPS, steps=100)
    ra, rb = robust_count(model, ours(x, y), y), robust_count(model, theirs(x, y), y)
    assert ra <= rb + int(0.005 * len(y)), (ra, rb)


# ---------------------------------------------------------------------------------------------- behaviour


def test_attributes_take_effect(plain, digits):
    x, y = digits.x_test[:16], digits.y_test[:16]
    atk = APGD(plain, eps=0.0, steps=5)
    assert torch.equal(atk(x, y), x)
    atk.eps = EPS
    out = atk(x, y)
    assert inside(out, x, EPS) and (out - x).abs().max() > EPS / 2
    atk.norm = "L2"
    out = atk(x, y)
    assert inside(out, x, EPS, "L2")
    atk.steps, atk.n_restarts = 0, 2
    assert inside(atk(x, y), x, EPS, "L2")


def test_state_restored_and_batched_equals_loop(plain, digits):
    model = nn.Sequential(nn.Dropout(0.0), plain)
    model.train()
    plain[0].weight.requires_grad_(True)
    x, y = digits.x_test[:32], digits.y_test[:32]
    a = APGDT(model, eps=EPS, steps=10, n_target_classes=3, batch_runs=True)(x, y)
    assert model.training and model[1].training and plain[0].weight.requires_grad
    b = APGDT(model, eps=EPS, steps=10, n_target_classes=3, batch_runs=False)(x, y)
    assert inside(a, x, EPS) and inside(b, x, EPS)


class _Noisy(nn.Module):
    """A randomized model: logits plus Gaussian noise at every forward; counts its forwards."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        out = self.model(x)
        return out + 0.5 * torch.randn_like(out)


def test_eot(plain, digits):
    x, y = digits.x_test[:16], digits.y_test[:16]
    noisy = _Noisy(plain)
    out = APGD(noisy, eps=EPS, steps=4, eot_iter=5)(x, y)
    assert inside(out, x, EPS)
    # one clean forward, then eot_iter forwards at the start and at each step (while any sample is robust)
    assert noisy.calls <= 1 + 5 * 5 and noisy.calls >= 1 + 5


def test_bad_inputs(plain, digits):
    x, y = digits.x_test[:4], digits.y_test[:4]
    atk = APGD(plain, eps=EPS, steps=2)
    with pytest.raises(ValueError, match="NaN"):
        atk(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="x must lie in"):
        atk(x + 2, y)
    with pytest.raises(ValueError, match="y must have shape"):
        atk(x, y[:2])
    with pytest.raises(TypeError, match="y must hold integer"):
        atk(x, y.float())
    with pytest.raises(ValueError, match="y must hold labels"):
        atk(x, y + 20)
    with pytest.raises(ValueError, match="norm"):
        APGD(plain, norm="L1")
    with pytest.raises(ValueError, match="loss"):
        APGD(plain, loss="hinge")
    atk.steps = -1
    with pytest.raises(ValueError, match="steps"):
        atk(x, y)
    atk.steps, atk.eps = 2, -1.0
    with pytest.raises(ValueError, match="eps"):
        atk(x, y)

    class NaNModel(nn.Module):
        def forward(self, inp):
            return torch.full((len(inp), 10), float("nan"))

    with pytest.raises(ValueError, match="non-finite"):
        APGD(NaNModel(), eps=EPS, steps=2)(x, y)


def test_bf16_autocast(plain, digits):
    """amp="bf16" runs the iterates under bfloat16 autocast: the forwards see bfloat16, the result
    stays in the ball, and the attack stays about as strong (a few samples of 200 either way)."""
    x, y = digits.x_test[:200], digits.y_test[:200]
    seen = []
    hook = plain.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        ref = APGD(plain, eps=EPS, steps=20)(x, y)
        n_ref = len(seen)
        atk = APGD(plain, eps=EPS, steps=20, amp="bf16")
        out = atk(x, y)
    finally:
        hook.remove()
    assert set(seen[:n_ref]) == {torch.float32} and torch.bfloat16 in seen[n_ref:]
    assert out.dtype == x.dtype and inside(out, x, EPS)
    assert abs(robust_count(plain, out, y) - robust_count(plain, ref, y)) <= 6
    atk.amp = "fp16"
    with pytest.raises(ValueError, match="amp must be None or 'bf16'"):
        atk(x, y)


def test_autoattack_passes_amp_to_the_apgd_stages_only(plain):
    from fastrob.attacks import AutoAttack

    stages = dict(AutoAttack(plain, eps=EPS, amp="bf16", seed=0).stages())
    assert stages["apgd-ce"].amp == "bf16" and stages["apgd-t"].amp == "bf16"
    assert not hasattr(stages["fab-t"], "amp") and not hasattr(stages["square"], "amp")
    with pytest.raises(ValueError, match="amp"):
        AutoAttack(plain, eps=EPS, amp="float16")
