"""Models: the half-Huber activation against its formula and derivatives, shapes, the CAM identity."""

import pytest
import torch

from fastrob.models import MLP, PreActResNet18, SmallCNN, activation, build_model
from fastrob.nn import BiasAct


def half_huber(d):
    return BiasAct(act="half_huber", d=d)


def test_half_huber_matches_its_formula_and_derivatives():
    d = 0.5
    x = torch.tensor([-1.0, -0.1, 0.0, 0.1, 0.25, 0.5, 0.7, 2.0], dtype=torch.float64, requires_grad=True)
    h = activation("half_huber")(x)  # d = 0.5, the models' activation
    expected = torch.where(x < 0, torch.zeros_like(x), torch.where(x <= d, x * x / (2 * d), x - d / 2))
    assert torch.allclose(h, expected)
    (g,) = torch.autograd.grad(h.sum(), x, create_graph=True)
    assert torch.allclose(g, torch.tensor([0, 0, 0, 0.2, 0.5, 1.0, 1, 1], dtype=torch.float64))
    (gg,) = torch.autograd.grad(g.sum(), x)
    # h'' = 1/d strictly inside [0, d] and 0 outside: the curvature gradient penalties need
    assert torch.allclose(gg[[3, 4]], torch.full((2,), 1 / d, dtype=torch.float64))
    assert torch.all(gg[[0, 1, 6, 7]] == 0)
    # continuous derivative at the joints
    for joint in (0.0, d):
        t = torch.tensor([joint - 1e-6, joint + 1e-6], dtype=torch.float64, requires_grad=True)
        (gt,) = torch.autograd.grad(half_huber(d)(t).sum(), t)
        assert abs(float(gt[1] - gt[0])) < 1e-5
    torch.autograd.gradgradcheck(
        half_huber(0.3), (torch.tensor([0.05, 0.2, 0.9], dtype=torch.float64, requires_grad=True),)
    )


def test_activation_names():
    assert [activation(a).act for a in ("relu", "softplus", "half_huber")] == ["relu", "softplus", "half_huber"]
    with pytest.raises(ValueError, match="activation must be one of"):
        activation("gelu")
    with pytest.raises(ValueError, match="d must be > 0"):
        half_huber(0.0)


@pytest.mark.parametrize(
    "name, shape, act",
    [
        *[
            (n, s, a)
            for n, s in (("mlp", (1, 8, 8)), ("cnn", (1, 16, 16)), ("cnn", (3, 8, 8)))
            for a in ("relu", "softplus", "half_huber")
        ],
        ("resnet18", (3, 32, 32), "half_huber"),
        ("resnet18", (1, 16, 16), "relu"),
    ],
)
def test_models_map_images_to_logits(name, shape, act):
    model = build_model(name, shape, 7, act).eval()
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7)
    acts = {m.act for m in model.modules() if isinstance(m, BiasAct)}
    assert acts == {act}


def test_cam_head_explains_the_logits_exactly():
    torch.manual_seed(0)
    model = SmallCNN(1, 10, width=8, activation_name="softplus")
    x = torch.rand(3, 1, 16, 16)
    maps = model.cam(x)
    assert maps.shape == (3, 10, 8, 8)
    assert torch.allclose(maps.mean((2, 3)) + model.head.bias, model(x), atol=1e-5)


def test_preact_resnet18_has_the_cifar_shape():
    model = PreActResNet18(num_classes=10, in_channels=3)
    n_params = sum(p.numel() for p in model.parameters())
    assert 11_000_000 < n_params < 11_300_000  # PreAct-ResNet-18 for CIFAR: about 11.2M
    assert len([m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]) == 1 + 16 + 3


@pytest.mark.parametrize(
    "args, words",
    [
        (("vgg", (1, 8, 8), 10), "model must be one of"),
        (("mlp", (1, 8, 8), 10, "tanh"), "activation must be one of"),
        (("mlp", (8, 8), 10), r"in_shape must be \(C, H, W\)"),
        (("resnet18", (1, 4, 4), 10), "at least 8x8"),
        (("mlp", (1, 8, 8), 1), "num_classes"),
    ],
)
def test_bad_model_arguments(args, words):
    with pytest.raises(ValueError, match=words):
        build_model(*args)


def test_mlp_hidden_widths():
    model = MLP((1, 4, 4), 3, hidden=(5,))
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [5, 3]


@pytest.mark.parametrize("name, shape", [("cnn", (1, 8, 8)), ("resnet18", (3, 8, 8))])
def test_models_use_fastrob_batch_norm_and_load_torch_checkpoints(name, shape):
    """Old checkpoints (torch.nn.BatchNorm2d layers) load: same keys; the layers are fastrob's."""
    from torch import nn

    from fastrob.nn import BatchNorm2d

    model = build_model(name, shape, 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is BatchNorm2d for m in bns)
    old = build_model(name, shape, 10)
    for parent in list(old.modules()):  # the pre-fastrob model: torch's BatchNorm2d in the same places
        for child_name, child in list(parent.named_children()):
            if type(child) is BatchNorm2d:
                setattr(parent, child_name, nn.BatchNorm2d(child.num_features))
    old.train()(torch.rand(4, *shape))  # running statistics and num_batches_tracked move
    model.load_state_dict(old.state_dict())  # strict
    old.eval()
    model.eval()
    x = torch.rand(2, *shape)
    torch.testing.assert_close(model(x), old(x))
