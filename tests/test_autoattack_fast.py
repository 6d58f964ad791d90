"""AutoAttack's "fast" version: the MALT targeting against a brute-force ranking, the version on a
linear model (against its exact robust set), the guard on honest and masking models, its record,
and AutoAttack's refusals of malformed stages and empty batches."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/

from bench.autoattack_fast import Planted  # noqa: E402  (the masking models the bench measures)
from fastrob.attacks import AutoAttack  # noqa: E402
from fastrob.attacks.apgd import apgd  # noqa: E402
from fastrob.attacks.autoattack import FAST_TARGETS  # noqa: E402
from fastrob.attacks.malt import MALTAPGDT, malt_scores, malt_targets  # noqa: E402

EPS = 0.1


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one intra-op thread is many times faster."""


def inside(x_adv, x, eps):
    return bool(((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-5).all()) and bool(
        (x_adv >= 0).all() and (x_adv <= 1).all()
    )


def small_mlp(seed=0, classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, classes)).eval()


def brute_force_distances(model, x, y, norm):
    """(z_y - z_t) / ‖∇_x(z_y - z_t)‖_* for every sample and class, one autograd call per pair."""
    out = torch.full((len(y), model(x[:1]).shape[1]), float("nan"))
    for i in range(len(y)):
        for t in range(out.shape[1]):
            if t == y[i]:
                continue
            xi = x[i : i + 1].clone().requires_grad_(True)
            z = model(xi)[0]
            margin = z[y[i]] - z[t]
            (g,) = torch.autograd.grad(margin, xi)
            dual = g.abs().sum() if norm == "Linf" else g.norm()
            out[i, t] = margin.item() / dual.item()
    return out


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_malt_scores_and_targets_match_brute_force(digits, norm):
    model, x, y = small_mlp(), digits.x_test[:12], digits.y_test[:12]
    expected = brute_force_distances(model, x, y, norm)
    candidates = torch.stack([torch.tensor([t for t in range(10) if t != yi][:6]) for yi in y.tolist()])
    scores = malt_scores(model, x, y, candidates, norm)
    torch.testing.assert_close(scores, expected.gather(1, candidates), rtol=1e-4, atol=1e-6)
    # targets: the k nearest of the c most confident classes, nearest first
    with torch.no_grad():
        logits = model(x)
    targets = malt_targets(model, x, y, n_targets=3, n_candidates=5, norm=norm)
    for i in range(len(y)):
        top = [t for t in logits[i].argsort(descending=True).tolist() if t != y[i]][:5]
        nearest = sorted(top, key=lambda t: expected[i, t].item())[:3]
        assert targets[i].tolist() == nearest


def test_malt_on_a_linear_model_is_the_exact_boundary_distance(digits):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x, y = digits.x_test[:8], digits.y_test[:8]
    w, b = model[1].weight.detach(), model[1].bias.detach()
    candidates = torch.stack([torch.tensor([t for t in range(10) if t != yi]) for yi in y.tolist()])
    z = x.flatten(1) @ w.T + b
    for i in range(len(y)):
        for j, t in enumerate(candidates[i].tolist()):
            expected = (z[i, y[i]] - z[i, t]) / (w[y[i]] - w[t]).abs().sum()
            assert malt_scores(model, x, y, candidates)[i, j].item() == pytest.approx(expected.item(), rel=1e-4)


def test_zero_gradient_puts_the_target_last():
    class Deaf(nn.Module):
        """Class 2's logit does not depend on x: its margin gradient is w_y alone; class 3 none at all."""

        def forward(self, x):
            s = x.flatten(1).sum(1, keepdim=True)
            z = torch.cat([s, 0 * s, 0 * s + 0.5, s * 0 + 0.1, -s], 1)
            return z

    x, y = torch.full((2, 1, 2, 2), 0.5), torch.tensor([1, 1])
    scores = malt_scores(Deaf(), x, y, torch.tensor([[2, 3], [3, 2]]))
    assert torch.isinf(scores).all() and (scores > 0).all()


def test_apgd_refuses_bad_targets(digits):
    model, x, y = small_mlp(), digits.x_test[:4], digits.y_test[:4]
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        apgd(model, x, y, loss="dlr-targeted", targets=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="other than the sample's label"):
        apgd(model, x, y, loss="dlr-targeted", targets=y[:, None])
    with pytest.raises(ValueError, match="other than the sample's label"):
        apgd(model, x, y, loss="dlr-targeted", targets=torch.full((4, 1), 10))
    with pytest.raises(ValueError, match="targets are for loss='dlr-targeted'"):
        apgd(model, x, y, loss="ce", targets=(y[:, None] + 1) % 10)


def test_explicit_targets_equal_the_ranked_ones(plain, digits):
    """apgd with the confidence ranking passed as targets gives what its own ranking gives."""
    x, y = digits.x_test[:16], digits.y_test[:16]
    with torch.no_grad():
        ranked = plain(x).scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, :2]
    own = apgd(plain, x, y, eps=EPS, steps=5, loss="dlr-targeted", n_target_classes=2, seed=3)
    given = apgd(plain, x, y, eps=EPS, steps=5, loss="dlr-targeted", targets=ranked, seed=3)
    assert torch.equal(own, given)


def exact_linf_robust(w, b, x, y, eps):
    """A linear model's exact robust set in the Linf ball ∩ [0, 1]: the coordinates separate, so the
    best perturbation toward t moves each pixel to the end of its interval that raises z_t - z_y."""
    x = x.flatten(1)
    z = x @ w.T + b
    lo, hi = (-x).clamp(min=-eps), (1 - x).clamp(max=eps)
    robust = torch.ones(len(y), dtype=torch.bool)
    for i in range(len(y)):
        for t in range(w.shape[0]):
            if t != y[i]:
                a = w[t] - w[y[i]]
                gain = torch.where(a > 0, a * hi[i], a * lo[i]).sum()
                robust[i] &= bool(z[i, t] - z[i, y[i]] + gain < 0)
    return robust


def test_fast_version_on_a_linear_model_finds_the_exact_robust_set(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(digits.x_train), digits.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = digits.x_test[:60], digits.y_test[:60]
    w, b = model[1].weight.detach(), model[1].bias.detach()
    eps = 0.02
    with torch.no_grad():
        exact = exact_linf_robust(w, b, x, y, eps) & (model(x).argmax(1) == y)
    assert 0 < exact.sum() < exact.numel() - 5  # both kinds of point are there
    out, record = AutoAttack(model, eps=eps, version="fast", seed=0, steps=30, quiet=True).run(x, y)
    assert inside(out, x, eps)
    assert record.robust.tolist() == exact.tolist()
    assert not record.guard_fired and record.skipped == ["fab-t", "square"]


def test_honest_model_skips_the_black_box_stages(plain, digits):
    x, y = digits.x_test[:40], digits.y_test[:40]
    atk = AutoAttack(plain, eps=EPS, version="fast", seed=0, steps=10, n_queries=50, quiet=True)
    assert [name for name, _ in atk.stages()] == ["apgd-ce", "apgd-t-malt"]
    assert [name for name, _ in atk.guarded_stages()] == ["fab-t", "square"]
    (_, malt) = atk.stages()[1]
    assert isinstance(malt, MALTAPGDT) and malt.n_target_classes == FAST_TARGETS
    out, record = atk.run(x, y)
    assert inside(out, x, EPS)
    assert record.stages == ["apgd-ce", "apgd-t-malt"] and record.skipped == ["fab-t", "square"]
    assert record.guard_fired is False
    assert set(record.guard) == {"probabilities", "randomized", "zero_gradients", "large_eps"}
    assert all(c["verdict"] == "ok" for c in record.guard.values())
    with torch.no_grad():
        robust = plain(out).argmax(1) == y
    assert record.robust.tolist() == robust.tolist()
    assert record.robust_accuracy["apgd-t-malt"] == pytest.approx(robust.float().mean().item())
    assert set(record.broken_by) <= {None, "clean", "apgd-ce", "apgd-t-malt"}
    assert torch.equal(out[robust], x[robust])


@pytest.mark.parametrize("kind,check", [("scaled", "zero_gradients"), ("rounded", "zero_gradients")])
def test_guard_fires_on_masking_models(plain, digits, kind, check):
    model, x, y = Planted(plain, kind), digits.x_test[:30], digits.y_test[:30]
    settings = dict(eps=EPS, seed=0, steps=10, n_queries=300, quiet=True)
    out, fast = AutoAttack(model, version="fast", **settings).run(x, y)
    _, standard = AutoAttack(model, version="standard", **settings).run(x, y)
    assert fast.guard_fired and fast.guard[check]["verdict"] == "suspicious"
    assert fast.stages == ["apgd-ce", "apgd-t-malt", "fab-t", "square"] and fast.skipped == []
    assert inside(out, x, EPS)
    assert fast.robust.sum() <= standard.robust.sum()


def test_fewer_than_four_classes_skip_the_targeted_stage(digits):
    model, x, y = small_mlp(classes=3), digits.x_test[:10], digits.y_test[:10] % 3
    _, record = AutoAttack(model, eps=EPS, version="fast", n_classes=3, seed=0, steps=3, quiet=True).run(x, y)
    assert "apgd-t-malt" not in record.broken_by and record.guard is not None


# ----------------------------------------------------------------------------------------------
# AutoAttack's refusals


@pytest.mark.parametrize(
    "attacks,match",
    [
        (["apgd"], r"attacks\[0\] must be an attack"),
        ([("apgd", "apgd-ce")], r"attacks\[0\] must be an attack"),
        ([(1, lambda a, b: a)], r"attacks\[0\]: a \(name, attack\) pair needs a str name"),
        ([], "at least one attack"),
        ("apgd", "attacks must be a list"),
    ],
)
def test_malformed_attacks_are_refused_up_front(attacks, match):
    with pytest.raises(ValueError, match=match):
        AutoAttack(small_mlp(), attacks=attacks)


def test_stage_returning_the_wrong_shape_is_named(plain, digits):
    x, y = digits.x_test[:6], digits.y_test[:6]
    atk = AutoAttack(plain, eps=EPS, attacks=[("flat", lambda xs, ys: xs.flatten(1))], quiet=True)
    with pytest.raises(ValueError, match=r"stage 'flat' returned \(\d+, 64\).*\(\d+, 1, 8, 8\)"):
        atk.run(x, y)
    atk.attacks = [("none", lambda xs, ys: None)]
    with pytest.raises(ValueError, match="stage 'none' returned NoneType"):
        atk.run(x, y)


@pytest.mark.parametrize("version", ["standard", "fast"])
def test_empty_batch_is_refused(version):
    atk = AutoAttack(small_mlp(), eps=EPS, version=version, quiet=True)
    with pytest.raises(ValueError, match="images holds no samples"):
        atk.run(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))


def test_evaluation_runs_the_fast_version_by_name():
    from fastrob import evaluation, metrics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.rand(24, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    atk = metrics.make_attack("autoattack-fast", model, 0.1, steps=5, n_queries=50)
    assert isinstance(atk, AutoAttack) and atk.version == "fast"
    assert metrics.describe_attack(atk).startswith("AutoAttack(fast, Linf, eps=0.1")
    settings = evaluation.EvalSettings(
        eps=[0.1],
        steps=5,
        ara_n=0,
        kl_eps=0,
        interp_eps=0,
        sens_eps=0,
        attack="autoattack-fast",
        attack_steps=5,
        attack_queries=50,
        masking_n=0,
    )
    results = evaluation.evaluate({"lin": model}, x, y, settings, quiet=True)
    assert results["lin"]["robust"].attack.startswith("AutoAttack(fast")
    assert "AA-fast@0.1" in evaluation.table(results, settings).splitlines()[0]
    assert "AutoAttack fast (APGD-CE and APGD-T on" in evaluation.legend(settings, results)


# ----------------------------------------------------------------------------------------------
# the attack's model mode reaches the MALT targeting and the guard


class ModeRecorder(nn.Module):
    """small_mlp with a dropout layer, recording the ``training`` flag of each forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 10))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.net(x)


def test_malt_targets_run_in_the_attacks_mode(digits):
    x, y = digits.x_test[:8], digits.y_test[:8]
    model = ModeRecorder().eval()
    atk = MALTAPGDT(model, eps=EPS, steps=2, seed=0)
    atk.set_model_training_mode(model_training=True)
    atk(x, y)
    assert model.modes and all(model.modes) and not model.training
    model.modes.clear()
    malt_targets(model, x, y, 3, 9)
    assert model.modes and not any(model.modes)


def test_the_guard_runs_in_the_attacks_mode(digits):
    """Attacked with its dropout on, the model is randomized: the guard sees it and runs FAB-T and Square."""
    x, y = digits.x_test[:16], digits.y_test[:16]
    model = ModeRecorder().eval()
    atk = AutoAttack(model, eps=EPS, version="fast", seed=0, steps=3, n_queries=20, quiet=True)
    assert atk.run(x, y)[1].guard["randomized"]["verdict"] == "ok"
    atk.set_model_training_mode(model_training=True, dropout_training=True)
    _, record = atk.run(x, y)
    assert record.guard["randomized"]["value"] > 0.5 and record.guard_fired
    assert record.stages[-2:] == ["fab-t", "square"] and not model.training


def test_cheap_checks_refuse_a_one_class_model(digits):
    from fastrob.attacks.masking_checks import cheap_checks

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    x = digits.x_test[:4]
    with pytest.raises(ValueError, match="model must return at least 2 logits per sample.*got 1"):
        cheap_checks(model, x, torch.zeros(4, dtype=torch.long))
