"""Models that do not return a plain logits tensor (logits_of), compiled models, channels_last inputs."""

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastrob
from fastrob import compiled
from fastrob.attacks import apgd, pgd
from fastrob.ops.pgd_step import pgd_step_reference


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@dataclasses.dataclass
class Output:  # a HuggingFace-style output object: attributes, not keys
    loss: torch.Tensor | None
    logits: torch.Tensor
    hidden: tuple


class Wrapped(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.body, self.kind = net(), kind

    def forward(self, x):
        z = self.body(x)
        if self.kind == "dict":
            return {"features": x.flatten(1), "logits": z}
        if self.kind == "tuple":
            return (z, x.flatten(1))
        return Output(None, z, (x,))


KEYS = {"dict": "logits", "tuple": 0, "object": "logits"}


def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("kind", list(KEYS))
def test_non_tensor_output_error_names_type_and_fix(kind):
    x, y = data()
    model = Wrapped(kind)
    for call in (
        lambda: fastrob.InputGradientRegularizer()(model, x, y),
        lambda: pgd(model, x, y, steps=1),
        lambda: apgd(model, x, y, steps=1),
        lambda: fastrob.robust_accuracy(model, (x, y), fastrob.PGD(model, steps=1), quiet=True),
    ):
        with pytest.raises(TypeError, match=r"fastrob\.logits_of\(model, ") as err:
            call()
        message = str(err.value)
        assert {"dict": "dict with keys", "tuple": "tuple of 2 items", "object": "Output with keys"}[kind] in message
        assert repr(KEYS[kind]) in message


@pytest.mark.parametrize("kind", list(KEYS))
def test_logits_of_runs_everywhere_like_the_plain_model(kind):
    x, y = data()
    model = Wrapped(kind)
    wrapped = fastrob.logits_of(model, KEYS[kind])
    plain = model.body
    assert list(wrapped.parameters()) == list(plain.parameters())
    # regularizer: same loss and parameter gradients as on the plain model
    reg = fastrob.InputGradientRegularizer(lam=1.0)
    grads = []
    for m in (wrapped, plain):
        plain.zero_grad()
        loss = reg(m, x, y).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in plain.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # attacks and a metric
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(pgd(wrapped, x, y, generator=g()), pgd(plain, x, y, generator=g()), rtol=0, atol=0)
    torch.testing.assert_close(apgd(wrapped, x, y, steps=3), apgd(plain, x, y, steps=3), rtol=0, atol=0)
    ra = [fastrob.robust_accuracy(m, (x, y), fastrob.PGD(m, steps=2), quiet=True) for m in (wrapped, plain)]
    assert ra[0].accuracy == ra[1].accuracy and ra[0].clean_accuracy == ra[1].clean_accuracy


def test_logits_of_keys_and_errors():
    x, _ = data()
    model = Wrapped("dict")
    z = model.body(x)
    torch.testing.assert_close(fastrob.logits_of(model, lambda out: out["logits"] * 2)(x), 2 * z)
    with pytest.raises(KeyError, match=r"no key or attribute 'logit'.*\['features', 'logits'\]"):
        fastrob.logits_of(model, "logit")(x)
    with pytest.raises(TypeError, match="key 0 is an index"):
        fastrob.logits_of(model, 0)(x)
    with pytest.raises(IndexError, match="out of range"):
        fastrob.logits_of(Wrapped("tuple"), 2)(x)
    with pytest.raises(TypeError, match="key must be an int index"):
        fastrob.logits_of(model, 1.5)
    with pytest.raises(TypeError, match="model must be callable"):
        fastrob.logits_of("model")
    assert "model.body.0.weight" in fastrob.logits_of(model).state_dict()


# ---- compiled models --------------------------------------------------------------------------


class CountingBackend:
    """A torch.compile backend that counts its compilations and runs the graph eagerly."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        return gm.forward


DOUBLE_BACKWARD = [
    lambda: fastrob.InputGradientRegularizer(lam=1.0),
    lambda: fastrob.JacobianRegularizer(lam=1.0, generator=torch.Generator().manual_seed(0)),
    lambda: fastrob.JSIGRRegularizer(patch=4, generator=torch.Generator().manual_seed(0)),
    lambda: fastrob.LipschitzRegularizer(generator=torch.Generator().manual_seed(0)),
    lambda: fastrob.InterpretationRegularizer(map="saliency", steps=1, generator=torch.Generator().manual_seed(0)),
]


@pytest.mark.parametrize("make", DOUBLE_BACKWARD)
def test_compiled_model_runs_eagerly_in_double_backward_paths_before_any_compile(make):
    x, y = data()
    plain = net()
    backend = CountingBackend()
    model = torch.compile(plain, backend=backend)
    compiled._warned.clear()
    results = []
    for m in (model, plain):
        plain.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            out = make()(m, x, y)
            out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in plain.parameters()], caught))
    assert backend.calls == 0  # nothing was compiled
    messages = [str(w.message) for w in results[0][2]]
    assert any("cannot be differentiated twice" in s and 'mode="fd"' in s for s in messages), messages
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one warning per regularizer class
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()(model, x, y)
    assert not [w for w in caught if "compiled" in str(w.message)]


def test_logits_of_a_compiled_model_runs_eagerly_in_double_backward():
    x, y = data()
    model = Wrapped("dict")
    backend = CountingBackend()
    wrapped = fastrob.logits_of(torch.compile(model, backend=backend), "logits").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fastrob.InputGradientRegularizer(lam=1.0)(wrapped, x, y).loss
    want = fastrob.InputGradientRegularizer(lam=1.0)(model.body, x, y).loss
    assert backend.calls == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_first_order_paths_keep_the_compiled_model():
    x, y = data()
    plain = net()
    backend = CountingBackend()
    model = torch.compile(plain, backend=backend)
    out = fastrob.InputGradientRegularizer(mode="fd")(model, x, y)
    out.loss.backward()
    assert backend.calls > 0
    calls = backend.calls
    adv = pgd(model, x, y, steps=2)
    assert adv.shape == x.shape
    fastrob.robust_accuracy(model, (x, y), fastrob.PGD(model, steps=1), quiet=True)
    assert backend.calls >= calls  # the compiled forward ran (recompiling for new shapes is torch's choice)


@pytest.mark.slow
def test_compiled_with_aot_autograd_really_fails_double_backward_and_the_regularizer_avoids_it():
    x, y = data()
    plain = net()
    model = torch.compile(plain, backend="aot_eager")
    xg = x.clone().requires_grad_(True)
    ce = F.cross_entropy(model(xg), y)
    (g,) = torch.autograd.grad(ce, xg, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastrob.InputGradientRegularizer()(model, x, y).loss.backward()


# ---- channels_last ----------------------------------------------------------------------------


class LayoutRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net()
        self.layouts = []

    def forward(self, x):
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        self.layouts.append("channels_last" if channels_last else "contiguous")
        return self.body(x)


@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("restarts", [1, 2])
def test_pgd_keeps_channels_last_every_step(random_start, restarts):
    x, y = data()
    model = LayoutRecorder()
    xc = x.contiguous(memory_format=torch.channels_last)
    out = fastrob.PGD(model, steps=4, random_start=random_start)(xc, y, restarts=restarts)
    assert model.layouts and set(model.layouts) == {"channels_last"}, model.layouts
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    if random_start:
        return  # a random start is drawn in memory order: another layout draws other values
    # same values as the contiguous run
    model.layouts.clear()
    torch.manual_seed(0)
    a = fastrob.PGD(model, steps=4, random_start=random_start)(x, y, restarts=restarts)
    torch.manual_seed(0)
    b = fastrob.PGD(model, steps=4, random_start=random_start)(xc, y, restarts=restarts)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_pgd_step_reference_keeps_x_adv_layout_with_mixed_operands():
    x, _ = data()
    xa = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    out = pgd_step_reference(xa, g, x, alpha=0.1, eps=0.2)
    assert out.stride() == xa.stride()


def test_a_mapping_is_searched_by_key_only():
    # dict.values is a method, not the entry "values": a missing key must be the clear error
    from fastrob.model_output import select

    with pytest.raises(KeyError, match="no key or attribute 'values'"):
        select({"a": torch.zeros(2, 3)}, "values")
