"""Modern building blocks, written here without timm: a ConvNeXt-style block, an EfficientNet-style
block, a custom autograd-Function activation and a model returning a dict. For each, every
double-backward regularizer equals a hand-written double backprop (loss and parameter gradients),
on the model as written and after ``patch_model``, whose report lists every module and which
leaves the output unchanged."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastrob
from fastrob.nn import BatchNorm2d, BiasAct, LayerNorm, patch_model, swap_activations, swap_batch_norm, swap_layer_norm
from fastrob.patching import BatchNormDropAct2d, PatchReport, classify


class LayerNorm2d(nn.LayerNorm):
    """timm-style channels-first LayerNorm: a subclass of nn.LayerNorm with its own forward."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class MyGELU(nn.GELU):
    """A GELU subclass that keeps torch's forward."""


class FunctionalGELU(nn.Module):
    """timm-style GELU: not an nn.GELU subclass, calls F.gelu."""

    def forward(self, x):
        return F.gelu(x)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pw1 = nn.Conv2d(dim, 2 * dim, 1)
        self.act = MyGELU()
        self.pw2 = nn.Conv2d(2 * dim, dim, 1)
        self.act2 = FunctionalGELU()

    def forward(self, x):
        return self.act2(x + self.pw2(self.act(self.pw1(self.norm(self.dwconv(x))))))


class TimmStyleBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: BN, then ``drop``, then ``act``, in one module."""

    def __init__(self, channels, act):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


TimmStyleBatchNormAct2d.__name__ = "BatchNormAct2d"


class SqueezeExcite(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduce = nn.Conv2d(dim, 2, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(2, dim, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class SwishFunction(torch.autograd.Function):
    """x * sigmoid(x) with a hand-written backward (twice differentiable: torch ops on saved x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class Swish(nn.Module):
    def forward(self, x):
        return SwishFunction.apply(x)


def head(dim, classes=3):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, classes))


def convnext():
    return nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), LayerNorm2d(4), ConvNeXtBlock(4), head(4))


def efficientnet():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        TimmStyleBatchNormAct2d(4, nn.SiLU()),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.BatchNorm2d(4),
        nn.SiLU(),
        SqueezeExcite(4),
        head(4),
    )


def custom_function():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Swish(), nn.Conv2d(4, 4, 3, padding=1), nn.Softplus(), head(4))


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = convnext()

    def forward(self, x):
        return {"logits": self.body(x), "aux": x.mean()}


def dict_model():
    return fastrob.logits_of(DictModel(), "logits")


MODELS = {"convnext": convnext, "efficientnet": efficientnet, "custom_function": custom_function, "dict": dict_model}


def build(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    for p in model.parameters():  # BN/LN affine parameters away from their 1/0 start
        p.data.add_(0.1 * torch.randn_like(p))
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 6, 6, generator=g), torch.tensor([0, 1, 2])


# ---- hand-written double backprop ---------------------------------------------------------------


def input_grad(out, x):
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    return g


def hand_input_gradient(model, x, y, lam):
    x = x.clone().requires_grad_(True)
    ce = F.cross_entropy(model(x), y, reduction="none")
    g = input_grad(ce.sum(), x)
    return ce.mean() + lam * g.flatten(1).pow(2).sum(1).mean()


def hand_jacobian_exact(model, x, y, lam):
    x = x.clone().requires_grad_(True)
    z = model(x)
    total = sum(input_grad(z[b, c], x).pow(2).sum() for b in range(z.shape[0]) for c in range(z.shape[1]))
    return F.cross_entropy(z, y) + lam * 0.5 * total / z.shape[0]


def hand_lipschitz(model, x, y, psi, seed):
    x = x.clone().requires_grad_(True)
    z = model(x)
    c = torch.randint(0, z.shape[1], (z.shape[0],), generator=torch.Generator().manual_seed(seed))
    g = input_grad(z.gather(1, c[:, None]).sum(), x)
    return F.cross_entropy(z, y) + psi * g.pow(2).mean()


def hand_jsigr(model, x, y, reg, seed):
    saliency = reg.saliency(model, x, y)  # a constant weight (no gradient); J-SIGR's tests check it
    x = x.clone().requires_grad_(True)
    z = model(x)
    ce = F.cross_entropy(z, y, reduction="none")
    v = torch.randn(1, *z.shape, generator=torch.Generator().manual_seed(seed))
    v = v / v.norm(dim=-1, keepdim=True)
    r_j = 0.5 * z.shape[1] * input_grad((z * v[0]).sum(), x).pow(2).sum() / z.shape[0]
    r_s = ((1 - saliency) * input_grad(ce.sum(), x)).flatten(1).pow(2).sum(1).mean()
    return ce.mean() + reg.lam_jacobian * r_j + reg.lam_saliency * r_s


CASES = {
    "input_gradient": (
        lambda seed: fastrob.InputGradientRegularizer(lam=0.5),
        lambda m, x, y, reg, seed: hand_input_gradient(m, x, y, 0.5),
    ),
    "jacobian_exact": (
        lambda seed: fastrob.JacobianRegularizer(lam=0.5, exact=True),
        lambda m, x, y, reg, seed: hand_jacobian_exact(m, x, y, 0.5),
    ),
    "lipschitz": (
        lambda seed: fastrob.LipschitzRegularizer(psi=3.0, zeta=0.0, generator=torch.Generator().manual_seed(seed)),
        lambda m, x, y, reg, seed: hand_lipschitz(m, x, y, 3.0, seed),
    ),
    "jsigr": (
        lambda seed: fastrob.JSIGRRegularizer(
            lam_jacobian=0.5, lam_saliency=0.5, patch=3, generator=torch.Generator().manual_seed(seed)
        ),
        lambda m, x, y, reg, seed: hand_jsigr(m, x, y, reg, seed),
    ),
}


def grads_of(loss, model):
    params = [p for p in model.parameters()]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("patched", [pytest.param(False, marks=pytest.mark.slow), True], ids=["as_written", "patched"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_double_backward_regularizer_equals_hand_written(name, patched):
    x, y = data()
    original = build(name)
    model = copy.deepcopy(original)
    if patched:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the custom-Function model may swap nothing
            model = patch_model(model, backend="torch")
    for case, (make, hand) in CASES.items():
        reg = make(5)
        got = reg(model, x, y).loss
        want = hand(original, x, y, reg, 5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} {case} loss")
        for a, b in zip(grads_of(got, model), grads_of(want, original)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{name} {case} parameter gradient")


def listed_modules(model):
    return {n for n, m in model.named_modules() if n and not isinstance(m, (nn.Sequential, nn.ModuleList))}


EXPECTED_SWAPS = {
    "convnext": {"1": "LayerNorm2d", "2.norm": "LayerNorm2d", "2.act": "BiasAct", "2.act2": "BiasAct"},
    "efficientnet": {
        "1": "BatchNormDropAct2d",
        "1.act": "BiasAct",
        "3": "BatchNorm2d",
        "4": "BiasAct",
        "5.gate": "BiasAct",
        "5.act": "BiasAct",
    },
    "custom_function": {"3": "BiasAct"},
    "dict": {"model.body.1": "LayerNorm2d", "model.body.2.act": "BiasAct", "model.body.2.act2": "BiasAct"},
}
EXPECTED_LEFT = {  # name -> a fragment of the reason
    "convnext": {"0": "linear"},
    "efficientnet": {"5": "its own forward"},
    "custom_function": {"1": "custom autograd Function"},
    "dict": {"model": "its own forward"},
}


@pytest.mark.parametrize("name", list(MODELS))
def test_patch_model_reports_every_module_and_keeps_the_output(name):
    x, _ = data()
    original = build(name)
    model, report = patch_model(copy.deepcopy(original), backend="torch", return_report=True)
    assert isinstance(report, PatchReport)
    swapped = {n: new for n, _, new in report.swapped}
    left = {n: reason for n, _, reason in report.left}
    assert not set(swapped) & set(left)
    assert set(swapped) | set(left) == listed_modules(original) | {n for n in swapped}, str(report)
    assert listed_modules(original) <= set(swapped) | set(left)
    for n, new in EXPECTED_SWAPS[name].items():
        assert swapped.get(n) == new, str(report)
    for n, fragment in EXPECTED_LEFT[name].items():
        assert fragment in left.get(n, ""), str(report)
    assert "out of patch_model's reach" in str(report)
    for mode in ("train", "eval"):
        getattr(original, mode)()
        getattr(model, mode)()
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-6, msg=mode)
    # the BatchNorm running statistics moved the same way in train mode
    for (n, a), (_, b) in zip(original.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(a, b, msg=n)


def test_patch_model_state_dict_keys_unchanged():
    original = build("efficientnet")
    model = patch_model(copy.deepcopy(original), backend="torch")
    assert isinstance(model[1], BatchNormDropAct2d) and isinstance(model[1].act, BiasAct)
    assert list(model.state_dict()) == list(original.state_dict())


def test_recognition_by_what_it_computes():
    assert classify(MyGELU()) == ("gelu", None)
    assert classify(FunctionalGELU()) == ("gelu", None)
    assert classify(nn.GELU(approximate="tanh")) == ("gelu_tanh", None)

    class TanhGELU(nn.Module):
        def forward(self, x):
            return F.gelu(x, approximate="tanh")

    class HalfGELU(nn.GELU):  # a subclass computing something else
        def forward(self, x):
            return 0.5 * super().forward(x)

    assert classify(TanhGELU()) == ("gelu_tanh", None)
    assert classify(HalfGELU())[0] is None
    assert classify(nn.Hardswish()) == ("hardswish", None)
    assert classify(Swish())[1].startswith("custom autograd Function")
    assert classify(nn.Dropout())[0] is None
    assert classify(nn.SyncBatchNorm(3))[1].startswith("SyncBatchNorm")


def test_probe_calls_no_hook():
    seen = []
    act = FunctionalGELU()
    act.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    patch_model(nn.Sequential(nn.Conv2d(1, 1, 1), act), backend="torch")
    assert seen == []


def test_patch_model_warns_once_when_nothing_swapped(monkeypatch):
    from fastrob import patching

    monkeypatch.setattr(patching, "_warned_nothing", False)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Tanh())
    with pytest.warns(UserWarning, match="patch_model swapped nothing(.|\n)*no fused op for group_norm"):
        patch_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(model)  # once per process
    monkeypatch.setattr(patching, "_warned_nothing", False)
    twice = patch_model(efficientnet(), backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = patch_model(twice, return_report=True)  # already fused: nothing to warn about
    assert not report.swapped and dict((n, r) for n, _, r in report.left)["1"] == "already fused"


def test_patch_model_act_and_batch_norm_options():
    model, report = patch_model(efficientnet(), act="softplus", batch_norm=False, return_report=True)
    assert type(model[3]) is nn.BatchNorm2d and type(model[1]) is TimmStyleBatchNormAct2d
    assert model[4].act == "softplus" and model[1].act.act == "softplus"
    assert model[5].gate.act == "sigmoid"  # act= replaces ReLU/Softplus/GELU/SiLU only; the gate is fused as is
    assert dict((n, r) for n, _, r in report.left)["3"] == "batch_norm=False"
    with pytest.raises(ValueError, match="act must be None or one of"):
        patch_model(model, act="tanh")


def test_probe_leaves_the_global_random_stream_alone():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.ReLU()).train()
    torch.manual_seed(0)
    patch_model(model, backend="torch")
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)


def test_swap_helpers_swap_only_their_kinds_and_never_warn():
    """swap_batch_norm / swap_layer_norm / swap_activations are patch_model limited to their kinds:
    each swaps its own and leaves the others, without patch_model's nothing-swapped warning."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        FunctionalGELU(),
        LayerNorm2d(4),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.LayerNorm(4 * 5 * 5),
    ).eval()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_batch_norm(model, backend="torch")
        assert type(model[1]) is BatchNorm2d and type(model[2]) is FunctionalGELU and type(model[6]) is nn.LayerNorm
        swap_layer_norm(model, backend="torch")
        assert type(model[6]) is LayerNorm and type(model[3]) is LayerNorm2d  # the channels-first subclass stays
        assert type(model[4]) is nn.Sigmoid
        swap_activations(model, backend="torch")
        assert [model[2].act, model[4].act] == ["gelu", "sigmoid"]
        assert swap_activations(nn.Sequential(nn.Linear(2, 2))) is not None  # nothing to swap: no warning
    torch.testing.assert_close(model(x), expected)
