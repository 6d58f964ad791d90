"""fastrob.interpret against straightforward references written here: CAM against the explicit sum
over channels, Grad-CAM and saliency against per-sample, per-class single backward passes, IG
against a loop over path points, IG's completeness, the maps' parameter gradients, and the promises
about the model's state.

The small float64 networks here are also used by test_interpretation.py and test_isa.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from fastrob import interpret

C = 5


class CamNet(nn.Module):
    """conv -> softplus -> conv(stride 2) -> softplus -> GAP -> linear, float64, for [B, 2, 6, 6]
    inputs (feature map [B, 6, 3, 3]); optionally with BatchNorm after the first conv."""

    def __init__(self, bn: bool = False, seed: int = 0, classes: int = C):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            *(
                [nn.Conv2d(2, 4, 3, padding=1)]
                + ([nn.BatchNorm2d(4)] if bn else [])
                + [nn.Softplus(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Softplus()]
            )
        )
        self.head = nn.Linear(6, classes)
        self.double()
        if bn:  # non-trivial running statistics, so that eval mode differs from train mode
            with torch.no_grad():
                bn_layer = self.features[1]
                bn_layer.running_mean.uniform_(-0.2, 0.2)
                bn_layer.running_var.uniform_(0.5, 1.5)
                bn_layer.weight.uniform_(0.5, 1.5)
                bn_layer.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def flat_net(seed=0):
    """A CNN without a CAM head: conv -> softplus -> conv -> softplus -> flatten -> linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(27, C),
    ).double()


def make_batch(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (batch,), generator=g)
    return x, y


def brute_cam(model, x):
    """[B, C, H', W'] by the explicit sum I_c = sum_k W_{c,k} A_k."""
    a = model.features(x)
    w = model.head.weight
    maps = []
    for c in range(w.shape[0]):
        m = 0
        for k in range(w.shape[1]):
            m = m + w[c, k] * a[:, k]
        maps.append(m)
    return torch.stack(maps, 1)


def brute_saliency(model, x):
    """[B, C, ...]: d z_{b,c} / d x_b from the explicit [B, C, B, ...] Jacobian (samples do not interact)."""
    jac = jacobian(lambda xx: model(xx), x, create_graph=True)
    idx = torch.arange(x.shape[0])
    return jac[idx, :, idx]


def brute_grad_cam(model, layer, x, relu=True):
    """One sample and one class at a time: a forward with a hook, one backward."""
    out = torch.zeros(0)
    rows = []
    for b in range(x.shape[0]):
        store = []
        h = layer.register_forward_hook(lambda m, i, o: store.append(o))
        z = model(x[b : b + 1])
        h.remove()
        a = store[0]
        per_class = []
        for c in range(z.shape[1]):
            (g,) = torch.autograd.grad(z[0, c], a, retain_graph=True)
            weights = g[0].mean((1, 2))
            m = (weights[:, None, None] * a[0]).sum(0)
            per_class.append(F.relu(m) if relu else m)
        rows.append(torch.stack(per_class))
    return torch.stack(rows) if rows else out


def brute_ig(model, x, baseline, steps):
    """Right Riemann sum, one path point and one sample at a time."""
    rows = []
    for b in range(x.shape[0]):
        total = 0
        for i in range(1, steps + 1):
            p = (baseline[b] + i / steps * (x[b] - baseline[b])).unsqueeze(0)
            total = total + jacobian(lambda xx: model(xx)[0], p)[:, 0]  # [C, ...]
        rows.append((x[b] - baseline[b]).unsqueeze(0) * total / steps)
    return torch.stack(rows)


def param_grads(value, model):
    return torch.autograd.grad(value, list(model.parameters()), retain_graph=True, allow_unused=True)


def assert_same_grads(a, b, rtol=1e-7, atol=1e-10):
    for ga, gb in zip(a, b):
        if gb is None:
            assert ga is None or torch.count_nonzero(ga) == 0
        else:
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


# ---- CAM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn, train", [(False, True), (True, False), (True, True)])
def test_cam_equals_the_explicit_formula_and_explains_the_logits(bn, train):
    model = CamNet(bn).train(train)
    x, y = make_batch()
    maps, logits = interpret.cam(model, x, return_logits=True)
    expected = brute_cam(model, x)
    assert maps.shape == (4, C, 3, 3)
    torch.testing.assert_close(maps, expected)
    # z_c = mean over space of I_c + b_c, and the returned logits are the model's
    torch.testing.assert_close(maps.mean((2, 3)) + model.head.bias, model(x))
    torch.testing.assert_close(logits, model(x))
    # the maps are differentiable in the parameters: a random functional's gradient matches
    w = torch.rand_like(expected)
    assert_same_grads(param_grads((maps * w).sum(), model), param_grads((expected * w).sum(), model))


def test_cam_class_selection_and_explicit_parts():
    model = CamNet()
    x, y = make_batch()
    full = brute_cam(model, x)
    torch.testing.assert_close(interpret.cam(model, x, y), full[torch.arange(4), y][:, None])
    pick = torch.tensor([[0, 3], [4, 4], [1, 0], [2, 1]])
    torch.testing.assert_close(interpret.cam(model, x, pick), full[torch.arange(4)[:, None], pick])
    torch.testing.assert_close(interpret.cam(model, x, 2), full[:, 2:3])
    # a plain Sequential: features and head passed explicitly
    seq = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.head)
    torch.testing.assert_close(interpret.cam(seq, x, features=seq[0], head=seq[3]), full)


def test_cam_without_a_head_says_what_to_pass():
    with pytest.raises(ValueError, match="features=.*head="):
        interpret.cam(flat_net(), make_batch()[0])


@pytest.mark.parametrize(
    "classes, error, match",
    [
        (torch.tensor([0, 1, 2, C]), ValueError, r"classes must lie in \[0, 5\)"),
        (torch.tensor([0, 1, -1, 2]), ValueError, "classes must lie"),
        (torch.tensor([0, 1, 2]), ValueError, "shape"),
        (torch.tensor([0.0, 1, 2, 3]), TypeError, "integer"),
        ("all", TypeError, "classes"),
    ],
)
def test_bad_classes(classes, error, match):
    with pytest.raises(error, match=match):
        interpret.cam(CamNet(), make_batch()[0], classes)


# ---- Grad-CAM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [True, False])
def test_grad_cam_equals_per_sample_reference(relu):
    model = flat_net()
    x, y = make_batch()
    layer = model[3]  # the softplus after the second conv: [B, 3, 3, 3]
    maps = interpret.grad_cam(model, x, layer=layer, relu=relu)
    expected = brute_grad_cam(model, layer, x, relu=relu)
    assert maps.shape == (4, C, 3, 3)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(
        interpret.grad_cam(model, x, y, layer=layer, relu=relu), expected[torch.arange(4), y][:, None]
    )


def test_grad_cam_of_a_gap_network_is_relu_cam_over_area():
    model = CamNet()
    x, _ = make_batch()
    maps = interpret.grad_cam(model, x, layer=model.features)
    torch.testing.assert_close(maps, F.relu(brute_cam(model, x)) / 9)


def test_grad_cam_is_differentiable_in_the_parameters():
    model = flat_net()
    x, _ = make_batch(2)
    layer = model[3]
    w = torch.rand(2, C, 3, 3, dtype=torch.float64)
    value = (interpret.grad_cam(model, x, layer=layer, relu=False) * w).sum()
    # reference: the same formula by explicit autograd on the whole batch with a graph
    store = []
    h = layer.register_forward_hook(lambda m, i, o: store.append(o))
    z = model(x)
    h.remove()
    a = store[0]
    ref = 0
    for c in range(C):
        (g,) = torch.autograd.grad(z[:, c].sum(), a, create_graph=True)
        ref = ref + ((g.mean((2, 3))[:, :, None, None] * a).sum(1) * w[:, c]).sum()
    torch.testing.assert_close(value, ref)
    assert_same_grads(param_grads(value, model), param_grads(ref, model))


def test_grad_cam_layer_errors():
    model = flat_net()
    x, _ = make_batch()
    with pytest.raises(TypeError, match="layer"):
        interpret.grad_cam(model, x, layer="features")
    with pytest.raises(ValueError, match="exactly once"):
        interpret.grad_cam(model, x, layer=nn.ReLU())  # not part of the model


# ---- saliency and IG -----------------------------------------------------------------------------


@pytest.mark.parametrize("net", [flat_net, CamNet])
def test_saliency_equals_the_jacobian_rows(net):
    model = net()
    x, y = make_batch()
    expected = brute_saliency(model, x)
    maps = interpret.saliency(model, x)
    assert maps.shape == (4, C, 2, 6, 6)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(interpret.saliency(model, x, y), expected[torch.arange(4), y][:, None])
    w = torch.rand_like(expected)
    assert_same_grads(param_grads((maps * w).sum(), model), param_grads((expected * w).sum(), model))


def test_saliency_is_differentiable_in_x():
    model = flat_net()
    x, y = make_batch(2)
    xl = x.clone().requires_grad_(True)
    value = interpret.saliency(model, xl, y).pow(2).sum()
    (g,) = torch.autograd.grad(value, xl)
    xr = x.clone().requires_grad_(True)
    ref = brute_saliency(model, xr)[torch.arange(2), y].pow(2).sum()
    (g_ref,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("batch_size", [None, 4, 9, 1000])
def test_integrated_gradients_equal_the_path_loop(batch_size):
    model = flat_net()
    x, y = make_batch()
    baseline = torch.rand(4, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 0.3
    expected = brute_ig(model, x, baseline, steps=5)
    maps = interpret.integrated_gradients(model, x, baseline=baseline, steps=5, batch_size=batch_size)
    assert maps.shape == (4, C, 2, 6, 6)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(
        interpret.integrated_gradients(model, x, y, baseline=baseline, steps=5), expected[torch.arange(4), y][:, None]
    )


def test_integrated_gradients_completeness():
    model = flat_net()
    x, _ = make_batch()
    with torch.no_grad():
        gap = model(x) - model(torch.zeros_like(x))  # zero baseline
    coarse = interpret.integrated_gradients(model, x, steps=5).flatten(2).sum(2)
    fine = interpret.integrated_gradients(model, x, steps=400).flatten(2).sum(2)
    err_fine = (fine - gap).abs().max()
    assert err_fine < 5e-3 * gap.abs().max(), (err_fine, gap.abs().max())
    assert err_fine < (coarse - gap).abs().max() / 20  # the right Riemann sum converges like 1/steps
    # exact for a model linear along the path, with any number of steps
    lin = nn.Sequential(nn.Flatten(), nn.Linear(72, C)).double()
    ig = interpret.integrated_gradients(lin, x, steps=1).flatten(2).sum(2)
    with torch.no_grad():
        torch.testing.assert_close(ig, lin(x) - lin(torch.zeros_like(x)))


def test_integrated_gradients_with_train_mode_batchnorm():
    # each path point normalised with its own batch statistics (as separate forwards would), the
    # running statistics untouched
    model = CamNet(bn=True).train()
    before = [b.clone() for b in model.buffers()]
    x, _ = make_batch()
    maps = interpret.integrated_gradients(model, x, steps=3, batch_size=8)  # chunks of 2 points, then 1
    for a, b in zip(before, model.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    total = 0
    for i in range(1, 4):
        p = (i / 3 * x).requires_grad_(True)
        z = model(p)
        total = total + torch.stack([torch.autograd.grad(z[:, c].sum(), p, retain_graph=True)[0] for c in range(C)], 1)
    torch.testing.assert_close(maps, x.unsqueeze(1) * total / 3)


def test_integrated_gradients_bad_arguments():
    model = flat_net()
    x, _ = make_batch()
    with pytest.raises(ValueError, match="steps"):
        interpret.integrated_gradients(model, x, steps=0)
    with pytest.raises(ValueError, match="baseline"):
        interpret.integrated_gradients(model, x, baseline=torch.zeros(3, 2, 6, 6, dtype=torch.float64))


# ---- the model's state ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cam", "grad_cam", "saliency", "ig"])
@pytest.mark.parametrize("train", [True, False])
def test_model_state_is_left_alone(name, train):
    model = CamNet(bn=True).train(train)
    model.head.weight.requires_grad_(False)  # a frozen layer stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    x, y = make_batch()
    fn = interpret.map_function(name, **({"layer": model.features} if name == "grad_cam" else {}))
    maps, logits = fn(model, x, None)
    assert maps.shape[:2] == (4, C) and logits.shape == (4, C)
    assert model.training == train and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not x.requires_grad
