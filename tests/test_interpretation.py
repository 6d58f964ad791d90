"""Boopathy et al.'s (2020) interpretation discrepancy and the Int / Int-Adv / Int2 / Int2-Adv regularizers against
brute force (explicit loops for D, explicit CAM and Jacobian maps, a hand-written PGD loop, float64),
the eps warm-up, the model's state, the dataset metric, and the paper's claim on digits: Int/Int2
training lowers the interpretation discrepancy under attack."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_interpret import C, CamNet, assert_same_grads, brute_cam, make_batch, param_grads
from torch.autograd.functional import jacobian
from train_loop import fit

import fastrob
from fastrob.metrics.map_discrepancy import discrepancy, interpretation_discrepancy
from fastrob.models import SmallCNN
from fastrob.ops.pgd_step import pgd_step_reference
from fastrob.regularizers.interpretation import InterpretationRegularizer


def brute_discrepancy(mc, ma, y, logits, kind):
    """Sample by sample, class by class; p~ by explicit exponentials over the classes c != y."""
    out = []
    for b in range(mc.shape[0]):
        yb = int(y[b])
        d = (ma[b, yb] - mc[b, yb]).abs().sum()
        if kind == "2class":
            others = [c for c in range(mc.shape[1]) if c != yb]
            e = torch.stack([logits[b, c].exp() for c in others])
            for w, c in zip(e / e.sum(), others):
                d = d + w * (ma[b, c] - mc[b, c]).abs().sum()
        out.append(d)
    return torch.stack(out)


# ---- the discrepancy ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["2class", "1class"])
def test_discrepancy_equals_brute_force(kind):
    g = torch.Generator().manual_seed(0)
    mc = torch.randn(5, C, 3, 4, generator=g, dtype=torch.float64)
    ma = (mc + 0.3 * torch.randn(5, C, 3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    logits = torch.randn(5, C, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.tensor([0, 4, 2, 2, 1])
    d = discrepancy(mc, ma, y, logits, kind)
    expected = brute_discrepancy(mc, ma, y, logits, kind)
    torch.testing.assert_close(d, expected)
    # differentiable in the maps and (2-class) through p~ in the logits
    w = torch.rand(5, dtype=torch.float64)
    ga = torch.autograd.grad((d * w).sum(), [ma, logits], allow_unused=True)
    gb = torch.autograd.grad((expected * w).sum(), [ma, logits], allow_unused=True)
    torch.testing.assert_close(ga[0], gb[0])
    if kind == "2class":
        torch.testing.assert_close(ga[1], gb[1])
        assert ga[1].abs().sum() > 0
    # 1-class from the maps of class y alone
    if kind == "1class":
        idx = torch.arange(5)
        torch.testing.assert_close(discrepancy(mc[idx, y][:, None], ma[idx, y][:, None], y, kind="1class"), expected)


def test_discrepancy_zero_at_equal_maps_and_bad_input():
    mc = torch.randn(3, C, 2, 2)
    y = torch.tensor([0, 1, 2])
    assert torch.equal(discrepancy(mc, mc.clone(), y, torch.randn(3, C)), torch.zeros(3))
    with pytest.raises(ValueError, match="kind"):
        discrepancy(mc, mc, y, kind="l2")
    with pytest.raises(ValueError, match="logits_adv"):
        discrepancy(mc, mc, y)
    with pytest.raises(ValueError, match="shape of maps_clean"):
        discrepancy(mc, mc[:, :2], y, torch.randn(3, C))
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 5\)"):
        discrepancy(mc, mc, torch.tensor([0, 1, 5]), torch.randn(3, C))


# ---- the regularizers against brute force ------------------------------------------------------------


def brute_maps(model, x, name):
    """(all-class maps, logits): CAM by the explicit channel sum; saliency as rows of the explicit
    Jacobian of the batch-summed logits, d(sum_j z_jc)/dx_b (with a graph, for double backprop)."""
    if name == "cam":
        return brute_cam(model, x), model(x)
    jac = jacobian(lambda xx: model(xx), x, create_graph=True)  # [B, C, B, ...]
    return jac.sum(0).transpose(0, 1), model(x)


def brute_attack(model, x, y, kind, lam, eps, alpha, steps, seed, name, disc):
    """The inner maximisation by hand: a uniform start drawn from the seeded generator (as
    fastrob.attacks.pgd draws it), then Linf steps of the reference pgd_step on the kind's objective."""
    m = copy.deepcopy(model).eval()
    x_adv = torch.clamp(
        x + torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(seed)), 0, 1
    )
    mc, _ = brute_maps(m, x, name)
    mc = mc.detach()
    for _ in range(steps):
        xa = x_adv.clone().requires_grad_(True)
        if kind in ("int2", "int2_adv"):
            j = F.cross_entropy(m(xa), y, reduction="sum")
        else:
            ma, z = brute_maps(m, xa, name)
            j = lam * brute_discrepancy(mc, ma, y, z, disc).sum()
            if kind == "int_adv":
                j = j + F.cross_entropy(z, y, reduction="sum")
        (g,) = torch.autograd.grad(j, xa)
        x_adv = pgd_step_reference(x_adv, g, x, alpha=alpha, eps=eps)
    return x_adv.detach()


def brute_loss(model, x, y, x_adv, kind, lam, name, disc):
    mc, zc = brute_maps(model, x, name)
    ma, za = brute_maps(model, x_adv, name)
    d = brute_discrepancy(mc, ma, y, za, disc).mean()
    ce = F.cross_entropy(za if kind.endswith("_adv") else zc, y)
    return ce + lam * d, ce, d


SPECS = [
    ("cam", False, True, "2class"),
    ("cam", True, False, "2class"),
    ("cam", True, True, "2class"),
    ("cam", False, True, "1class"),
    ("saliency", False, True, "2class"),
]
SPEC_IDS = ["cam", "cam-bn-eval", "cam-bn-train", "cam-1class", "saliency"]


@pytest.mark.parametrize("kind", ["int", "int_adv", "int2", "int2_adv"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_regularizer_equals_brute_force(kind, spec):
    name, bn, train, disc = spec
    if name == "saliency" and kind in ("int_adv", "int2_adv"):
        pytest.skip("saliency is covered by int and int2 (double backprop is the same)")
    model = CamNet(bn).train(train)
    reference = copy.deepcopy(model)
    x, y = make_batch()
    eps, alpha, steps, lam = 0.2, 0.07, 3, 0.3
    reg = InterpretationRegularizer(
        kind,
        lam=lam,
        eps=eps,
        alpha=alpha,
        steps=steps,
        map=name,
        discrepancy=disc,
        generator=torch.Generator().manual_seed(11),
    )
    out = reg(model, x, y)
    x_adv = brute_attack(reference, x, y, kind, lam, eps, alpha, steps, 11, name, disc)
    loss, ce, d = brute_loss(reference, x, y, x_adv, kind, lam, name, disc)
    # the attack moved the maps (the comparison is not of two zeros), and stayed in the ball
    assert d > 1e-3 and (x_adv - x).abs().max() <= eps + 1e-12
    torch.testing.assert_close(out.penalty, d, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.ce, ce, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss, loss, rtol=1e-9, atol=1e-12)
    assert_same_grads(param_grads(out.loss, model), param_grads(loss, reference))
    assert out.logits.shape == (4, C)


@pytest.mark.parametrize("kind", ["int_adv", "int2"])
def test_fused_backend_equals_torch(kind):
    # backend="triton" (the interpreter on CPU) runs the CE and the inner attack's PGD step fused:
    # int_adv its own loop of pgd_step + the CE inside the attack, int2 the pgd engine
    model = CamNet().float().eval()  # float32: the Triton pgd_step has no float64
    x, y = make_batch()
    x = x.float()
    out = {}
    for backend in ("torch", "triton"):
        m = copy.deepcopy(model)
        reg = InterpretationRegularizer(
            kind, lam=0.3, eps=0.2, alpha=0.07, steps=2, backend=backend, generator=torch.Generator().manual_seed(5)
        )
        o = reg(m, x, y)
        out[backend] = (o.loss.detach(), param_grads(o.loss, m))
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    assert_same_grads(out["triton"][1], out["torch"][1], rtol=1e-4, atol=1e-5)
    # the backend reaches the ops (else both runs above would be torch): cuda cannot take CPU tensors
    with pytest.raises(RuntimeError, match="cuda"):
        InterpretationRegularizer(kind, eps=0.2, alpha=0.07, steps=2, backend="cuda")(model, x, y)


def test_int_attack_increases_the_discrepancy():
    # Int's inner attack ascends D: more steps from the same start give a larger D than the start
    model = CamNet().eval()
    x, y = make_batch(8)
    ds = []
    for steps in (0, 5):
        r = InterpretationRegularizer(
            "int", eps=0.2, alpha=0.05, steps=steps, generator=torch.Generator().manual_seed(0)
        )
        x_adv = r.perturb(model, x, y, eps=0.2, alpha=0.05)
        ds.append(brute_discrepancy(brute_cam(model, x), brute_cam(model, x_adv), y, model(x_adv), "2class").mean())
    assert ds[1] > 1.5 * ds[0], ds


# ---- the eps schedule ----------------------------------------------------------------------------------


def test_warmup_schedule():
    reg = InterpretationRegularizer("int2", eps=0.4, steps=4, warmup=(2, 6))
    assert [reg.schedule(s) for s in range(8)] == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1]
    assert reg.current_eps(4) == pytest.approx((0.2, 2.5 * 0.2 / 4))
    assert InterpretationRegularizer(eps=0.4, alpha=0.1, warmup=(0, 4)).current_eps(1) == pytest.approx((0.1, 0.025))
    assert InterpretationRegularizer(warmup=lambda s: 0.5).schedule(100) == 0.5
    assert (
        InterpretationRegularizer(warmup=(3, 3)).schedule(2) == 0
        and InterpretationRegularizer(warmup=(3, 3)).schedule(3) == 1
    )
    model = CamNet()
    x, y = make_batch()
    for expect_zero in (True, True, True, False):  # calls 0, 1, 2 have eps 0; call 3 has eps 0.1
        out = reg(model, x, y)
        if expect_zero:
            assert out.penalty == 0 and torch.equal(out.loss, out.ce)
            torch.testing.assert_close(out.ce, F.cross_entropy(model(x), y))
        else:
            assert out.penalty > 0
    assert reg.step == 4
    reg.step = 100  # users can set the counter (resume)
    assert reg.current_eps() == (0.4, 2.5 * 0.4 / 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kind="int3"), ValueError, "kind"),
        (dict(lam=-1.0), ValueError, "lam"),
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(norm="l1"), ValueError, "norm"),
        (dict(map="lime"), ValueError, "map"),
        (dict(map="grad_cam"), ValueError, "layer"),
        (dict(discrepancy="l2"), ValueError, "discrepancy"),
        (dict(warmup=(5, 2)), ValueError, "warmup"),
        (dict(warmup=(1, 2, 3)), ValueError, "warmup"),
        (dict(random_start="trades"), ValueError, "random_start"),
    ],
)
def test_bad_construction_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        InterpretationRegularizer(**kwargs)


def test_bad_calls():
    x, y = make_batch()
    reg = InterpretationRegularizer("int")
    with pytest.raises(ValueError, match=r"y must have shape \[batch\]"):
        reg(CamNet(), x, y[:3])
    with pytest.raises(ValueError, match="features=.*head="):
        reg(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(72, C)).double(), x, y)
    with pytest.raises(ValueError, match="warmup"):
        InterpretationRegularizer(warmup=lambda s: 2.0)(CamNet(), x, y)


def own_saliency(model, x, classes, create_graph=True):
    """A user's callable map: it makes two forwards of its own (each would move BatchNorm)."""
    model(x)
    return fastrob.interpret.saliency(model, x, classes, create_graph=create_graph)


# every kind with CAM; IG (whose path forwards keep the statistics) and a callable map (which makes
# forwards of its own) with one kind of each attack (the maps' handling is the same for all kinds)
@pytest.mark.parametrize(
    "kind, map_name",
    [(k, "cam") for k in ("int", "int_adv", "int2", "int2_adv")]
    + [(k, m) for k in ("int_adv", "int2") for m in ("ig", "callable")],
)
@pytest.mark.parametrize("train", [True, False])
def test_model_state_x_and_grads_are_left_alone(kind, map_name, train):
    model = CamNet(bn=True).train(train)
    reference = copy.deepcopy(model)
    x, y = make_batch(6)
    x_before = x.clone()
    map_fn = own_saliency if map_name == "callable" else map_name
    out = InterpretationRegularizer(kind, eps=0.1, steps=2, map=map_fn)(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x_before) and not x.requires_grad
    reference(x)  # BatchNorm's running statistics move exactly as after one plain forward
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.training == train and all(p.requires_grad for p in model.parameters())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- the dataset metric ------------------------------------------------------------------------------


def test_interpretation_discrepancy_metric_equals_per_batch_brute_force():
    model = CamNet(bn=True).train()
    x, y = make_batch(10)
    attack = lambda xx, yy: (xx + 0.05).clamp(0, 1)  # noqa: E731  (deterministic)
    res = interpretation_discrepancy(model, (x, y), attack, batch_size=4, quiet=True)
    assert model.training  # restored
    ev = copy.deepcopy(model).eval()
    with torch.no_grad():
        x_adv = attack(x, y)
        expected = brute_discrepancy(brute_cam(ev, x), brute_cam(ev, x_adv), y, ev(x_adv), "2class")
        fooled = ev(x_adv).argmax(1) != y
    torch.testing.assert_close(res.values, expected.float())
    assert res.mean == pytest.approx(float(expected.mean()), rel=1e-5)
    assert torch.equal(res.fooled, fooled)
    d = res.as_dict()
    assert d["n"] == 10 and d["map"] == "cam" and d["kind"] == "2class" and 0 <= d["fooled_rate"] <= 1
    one = interpretation_discrepancy(model, (x, y), attack, kind="1class", batch_size=4, quiet=True)
    with torch.no_grad():
        expected = brute_discrepancy(brute_cam(ev, x), brute_cam(ev, x_adv), y, ev(x_adv), "1class")
    torch.testing.assert_close(one.values, expected.float())
    auto = interpretation_discrepancy(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(72, C)).double(),
        (x, y),
        attack,
        map="auto",
        kind="1class",
        quiet=True,
    )
    assert auto.map == "saliency" and auto.values.shape == (10,)
    with pytest.raises(TypeError, match="attack"):
        interpretation_discrepancy(model, (x, y), None)


# ---- digits: training runs, and the paper's claim --------------------------------------------------------


def train_digits(digits, reg, epochs=5, n=None, batch=64):
    torch.manual_seed(0)
    model = SmallCNN(1, 10, width=8)  # BatchNorm, ReLU, CAM head (CAM needs no second derivative)
    losses = fit(
        model,
        digits.x_train[:n],
        digits.y_train[:n],
        None if reg is None else lambda m, x, y: reg(m, x, y).loss,
        epochs=epochs,
        batch=batch,
    )
    return model.eval(), losses


@pytest.mark.parametrize(
    "kind, map_name",
    [
        ("int", "cam"),
        ("int_adv", "cam"),
        ("int2", "cam"),
        ("int2_adv", "cam"),
        ("int", "saliency"),
        ("int2", "saliency"),
    ],
)
def test_each_regularizer_trains_on_digits_without_nan(digits, kind, map_name, one_thread):
    reg = InterpretationRegularizer(kind, eps=0.1, steps=2, map=map_name, warmup=(0, 3))
    model, losses = train_digits(digits, reg, epochs=1, n=256)
    assert all(torch.isfinite(torch.tensor(losses))) and all(torch.isfinite(p).all() for p in model.parameters())
    assert reg.step == 4


def test_int_and_int2_lower_the_interpretation_discrepancy_under_attack(digits, one_thread):
    # Boopathy et al.: training for robust interpretation (Int, Int2; lambda = 0.01, 2-class D on
    # CAM) lowers the discrepancy that a PGD attack causes, compared with plain training. Measured
    # here (2-core CPU, 5 epochs): D 41.3 plain, 29.3 Int, 27.5 Int2, while the maps' own l1 size
    # drops only ~6%, so the maps are not merely shrunk.
    x, y = digits.x_test[:200], digits.y_test[:200]
    results = {}
    for name, reg in [
        ("plain", None),
        ("int", InterpretationRegularizer("int", eps=0.1, steps=3)),
        ("int2", InterpretationRegularizer("int2", eps=0.1, steps=3)),
    ]:
        model, _ = train_digits(digits, reg)
        acc = (model(x).argmax(1) == y).float().mean().item()
        attack = fastrob.PGD(model, eps=0.1, alpha=0.025, steps=10, generator=torch.Generator().manual_seed(0))
        d = interpretation_discrepancy(model, (x, y), attack, quiet=True).mean
        with torch.no_grad():
            size = fastrob.interpret.cam(model, x).abs().flatten(1).sum(1).mean().item()
        results[name] = acc, d, d / size
    acc0, d0, rel0 = results.pop("plain")
    assert acc0 > 0.85, acc0
    for name, (acc, d, rel) in results.items():
        assert acc > acc0 - 0.05, (name, acc, acc0)
        assert d < 0.85 * d0 and rel < 0.9 * rel0, (name, d, d0, rel, rel0)


@pytest.mark.parametrize("kind", ["int", "int2_adv"])
def test_bf16_autocast(kind):
    model = SmallCNN(1, 10, width=4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    ref = InterpretationRegularizer(kind, generator=torch.Generator().manual_seed(0))(copy.deepcopy(model), x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = InterpretationRegularizer(kind, generator=torch.Generator().manual_seed(0))(model, x, y)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.penalty, ref.penalty, rtol=0.1, atol=1e-3)
