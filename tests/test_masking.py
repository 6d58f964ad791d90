"""fastrob.metrics.masking_report: each planted kind of gradient masking is flagged by its check, honest
digits models pass, the result's JSON / table, the fallback without APGD / Square, bad inputs."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_fab import make_cnn
from train_loop import fit

import fastrob
from fastrob.metrics import masking_report
from fastrob.regularizers import InputGradientRegularizer

pytestmark = pytest.mark.usefixtures("one_thread")  # small nets run faster on one thread of a loaded machine

FAST = dict(n=40, steps=10, strong_factor=2, n_queries=300, quiet=True)  # the default run's small settings


def trained(digits, objective=None, epochs=12):
    torch.manual_seed(0)
    model = make_cnn()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fit(model, digits.x_train, digits.y_train, objective, epochs=epochs, batch=128)
    torch.set_num_threads(threads)
    model.eval()
    return model


@pytest.fixture(scope="module")
def plain(digits):
    return trained(digits)


class Planted(nn.Module):
    """The plain model with one kind of gradient masking planted."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x):
        if self.kind == "quantized":  # round to the digits' 17 grey levels: same predictions, zero gradient
            x = torch.round(x * 16) / 16
        z = self.model(x)
        if self.kind == "softmax":
            return F.softmax(z, dim=1)
        if self.kind == "noisy":
            return z + 0.5 * torch.randn_like(z)
        if self.kind == "saturated":  # CE saturates: its input gradient underflows to exactly 0
            return 1000 * z
        return z


@pytest.mark.parametrize(
    "kind,checks",
    [
        ("softmax", ["probabilities"]),
        ("quantized", ["zero_gradients", "black_box"]),
        ("noisy", ["randomized"]),
        ("saturated", ["zero_gradients", "ce_vs_dlr"]),
    ],
)
def test_planted_masking_is_flagged_by_its_check(plain, digits, kind, checks):
    report = masking_report(Planted(plain, kind), (digits.x_test, digits.y_test), 0.1, **FAST)
    assert report.verdict == "suspicious"
    for name in checks:
        assert report[name].verdict == "suspicious", report.table()
    # the checks that do not concern this kind stay quiet (the plain model behind it is honest)
    assert report["large_eps"].verdict == "ok" or kind == "quantized", report.table()


def test_planted_l2(plain, digits):
    report = masking_report(Planted(plain, "saturated"), (digits.x_test, digits.y_test), 1.0, "l2", **FAST)
    assert report["zero_gradients"].verdict == "suspicious" and report["ce_vs_dlr"].verdict == "suspicious"


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_plain_model_passes(plain, digits, norm, eps):
    report = masking_report(plain, (digits.x_test, digits.y_test), eps, norm, **FAST)
    assert report.verdict == "ok", report.table()
    assert all(c.value is not None for c in report.checks)


def pgd_trained(digits):
    def objective(model, xb, yb):
        model.eval()
        x_adv = fastrob.attacks.pgd(model, xb, yb, eps=0.1, alpha=0.025, steps=5)
        model.train()
        return F.cross_entropy(model(x_adv), yb)

    return trained(digits, objective)


def gradient_penalty_trained(digits):
    regularizer = InputGradientRegularizer(lam=1.0)
    return trained(digits, lambda model, xb, yb: regularizer(model, xb, yb).loss)


@pytest.mark.slow
@pytest.mark.parametrize("build", [pgd_trained, gradient_penalty_trained])
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_honest_trained_models_pass(digits, build, norm, eps):
    report = masking_report(build(digits), (digits.x_test, digits.y_test), eps, norm, n=150, quiet=True)
    assert report.verdict == "ok", report.table()


@pytest.mark.slow
def test_plain_model_passes_at_full_settings(plain, digits):
    report = masking_report(plain, (digits.x_test, digits.y_test), 0.1, n=None, quiet=True)
    assert report.verdict == "ok", report.table()


def test_result_dict_table_and_robust_mask(plain, digits):
    report = masking_report(plain, (digits.x_test, digits.y_test), 0.1, **FAST)
    d = json.loads(json.dumps(report.as_dict()))
    names = ["black_box", "large_eps", "convergence", "zero_gradients", "randomized", "probabilities", "ce_vs_dlr"]
    assert list(d["checks"]) == names
    assert d["verdict"] == report.verdict and d["n"] == 40
    table = str(report)
    assert all(name in table for name in names) and report.verdict in table.splitlines()[0]
    # the robust mask: correct points that every attack of the report failed on
    assert report.robust.shape == (40,) and report.robust.dtype == torch.bool
    assert report.robust_accuracy == pytest.approx(report.robust.float().mean().item())
    assert report.robust_accuracy <= report.clean_accuracy
    with torch.no_grad():
        wrong = plain(digits.x_test[:40]).argmax(1) != digits.y_test[:40]
    assert not report.robust[wrong].any()
    with pytest.raises(KeyError, match="no check named"):
        report["nope"]


def test_loader_input_and_model_state(digits):
    torch.manual_seed(0)
    model = make_cnn()
    model.train()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(digits.x_test[:24], digits.y_test[:24]), batch_size=10
    )
    report = masking_report(model, loader, 0.1, **dict(FAST, n=None))
    assert report.n == 24
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(norm="L3"), ValueError, "norm"),
        (dict(n=0), ValueError, "n must"),
        (dict(steps=0), ValueError, "steps"),
        (dict(n_queries=1.5), TypeError, "n_queries"),
        (dict(large_eps=float("inf")), ValueError, "large_eps"),
    ],
)
def test_bad_arguments(plain, digits, kwargs, error, match):
    options = dict(eps=0.1, quiet=True, n=8)
    options.update(kwargs)
    with pytest.raises(error, match=match):
        masking_report(plain, (digits.x_test, digits.y_test), **options)


def test_bad_data(plain, digits):
    with pytest.raises(ValueError, match="no samples"):
        masking_report(plain, (digits.x_test[:0], digits.y_test[:0]), 0.1, quiet=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        masking_report(plain, (digits.x_test[:8] * 3, digits.y_test[:8]), 0.1, quiet=True)
    with pytest.raises(TypeError, match="data"):
        masking_report(plain, digits.x_test, 0.1, quiet=True)

    class NaNModel(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 10), float("nan"))

    with pytest.raises(ValueError, match="non-finite"):
        masking_report(NaNModel(), (digits.x_test[:8], digits.y_test[:8]), 0.1, quiet=True)


def test_two_classes_skip_the_dlr_comparison(digits):
    """DLR needs 3 classes: with 2 the CE-vs-DLR check is n/a and the others still run."""
    keep = digits.y_train < 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    fit(model, digits.x_train[keep], digits.y_train[keep], epochs=3)
    test = digits.y_test < 2
    report = masking_report(model, (digits.x_test[test], digits.y_test[test]), 0.1, **FAST)
    assert report["ce_vs_dlr"].verdict == "n/a"
    assert all(c.value is not None for c in report.checks if c.name != "ce_vs_dlr")
