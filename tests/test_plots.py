"""Plots: the surface and saliency computations against analytic values on linear models, and
every figure writes a readable PNG."""

import matplotlib.image as mpimg
import pytest
import torch
from torch import nn

from fastrob import plots
from fastrob.metrics import accuracy_curve, ara
from fastrob.models import SmallCNN


def linear(d=16, classes=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).eval()


def test_surface_of_a_two_class_linear_model_is_the_analytic_plane():
    model = linear()
    x = torch.rand(3, 1, 4, 4)
    y = torch.tensor([0, 1, 0])
    s = plots.surface(model, x, y, span=0.2, resolution=5)
    w = model[1].weight
    sign = torch.where(y == 1, 1.0, -1.0)  # margin = ±(z1 - z0)
    diff = (w[1] - w[0]).detach()
    with torch.no_grad():
        z = model(x)
    for i in range(3):
        m0 = float(sign[i] * (z[i, 1] - z[i, 0]))
        assert s["margin"][i, 2, 2] == pytest.approx(m0, abs=1e-5)  # the centre is the input
        # along a (b = 0) the margin falls at rate sign·(w1 - w0)·u = -‖w1 - w0‖₁: steepest Linf descent
        slope = (s["margin"][i, 2, 4] - s["margin"][i, 2, 0]) / 0.4
        assert float(slope) == pytest.approx(-float(diff.abs().sum()), rel=1e-4)
        # linear in (a, b): every 2x2 cell has zero mixed difference
        g = s["margin"][i]
        assert torch.allclose(g[1:, 1:] - g[1:, :-1] - g[:-1, 1:] + g[:-1, :-1], torch.zeros(4, 4), atol=1e-4)
    assert s["loss"].shape == (3, 5, 5) and bool((s["loss"] >= 0).all())


def test_saliency_of_a_linear_model_is_its_weight_row():
    model = linear(classes=3)
    x = torch.rand(4, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 1])
    sal = plots.saliency(model, x, y)
    expected = model[1].weight.detach().abs()[y].view(4, 4, 4)
    assert torch.allclose(sal, expected)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_cam_is_upsampled_to_the_input_and_none_without_a_head():
    model = SmallCNN(1, 10, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    maps = plots.cam(model, x, torch.tensor([3, 5]))
    assert maps.shape == (2, 16, 16)
    assert torch.allclose(maps.mean((1, 2)), model.cam(x)[[0, 1], [3, 5]].mean((1, 2)), atol=1e-5)
    assert plots.cam(linear(), x[:, :, :4, :4], torch.tensor([0, 1])) is None


def _png(path):
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # something is drawn
    return image


def test_every_figure_writes_a_png(tmp_path, digits):
    model = SmallCNN(1, 10, width=4).eval()
    other = linear(64, 10)
    x, y = digits.x_test[:40], digits.y_test[:40]
    models = {"cnn": model, "linear": other}
    curves = {n: accuracy_curve(m, (x, y), [0.05, 0.1], steps=2, quiet=True) for n, m in models.items()}
    aras = {n: ara(m, (x, y), n=40, steps=3, search_steps=3, quiet=True) for n, m in models.items()}
    history = [
        {
            "epoch": e,
            "loss": 1.0 / e,
            "ce": 0.8 / e,
            "penalty": 0.2 / e,
            "train_accuracy": 0.5 + e / 10,
            "test_accuracy": 0.4 + e / 10,
        }
        for e in (1, 2, 3)
    ]
    paths = [
        plots.training_curves(history, str(tmp_path / "t.png"), title="t"),
        plots.accuracy_curves(curves, str(tmp_path / "a.png")),
        plots.ara_curves(aras, str(tmp_path / "r.png")),
        plots.surfaces(models, x[:2], y[:2], str(tmp_path / "s.png"), resolution=7),
        plots.saliency_grid(models, x[:3], y[:3], str(tmp_path / "g.png")),
    ]
    for p in paths:
        _png(p)
    # the saliency grid has a CAM column for the CNN only: input + 2 saliency + 1 CAM
    wide, narrow = _png(paths[4]), None
    plots.saliency_grid({"linear": other}, x[:3], y[:3], str(tmp_path / "g1.png"))
    narrow = _png(str(tmp_path / "g1.png"))
    assert wide.shape[1] > 1.7 * narrow.shape[1]
