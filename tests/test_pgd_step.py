"""fastrob.ops.pgd_step: the reference against hand-computed steps and torchattacks' update
sequence, every backend against the reference, layouts, and errors."""

import math

import pytest
import torch

from fastrob import _backend
from fastrob.ops import pgd_step, pgd_step_reference
from fastrob.ops.pgd_step import SPEC
from fastrob.triton import pgd_step as triton_kernels


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0, eps=0.1):
    g = torch.Generator().manual_seed(seed)
    x_orig = torch.rand(shape, generator=g)
    x_adv = (x_orig + eps * (2 * torch.rand(shape, generator=g) - 1)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x_adv, grad, x_orig)]


def make_l2_inputs(shape, dtype=torch.float32, device="cpu", seed=0, radius=0.3):
    """Inputs where every term of the L2 step matters: the current perturbation has norm
    ``radius`` per sample (comparable to eps and alpha) and is correlated with the gradient, and
    x_orig stays clear of the box so clamping does not hide errors."""
    g = torch.Generator().manual_seed(seed)
    x_orig = 0.2 + 0.6 * torch.rand(shape, generator=g)
    grad = torch.randn(shape, generator=g)

    def unit(t):
        return t / t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))

    delta = radius * unit(unit(grad) + unit(torch.randn(shape, generator=g)))
    return [t.to(device=device, dtype=dtype) for t in (x_orig + delta, grad, x_orig)]


def inputs_for(norm, shape, dtype=torch.float32, device="cpu"):
    return make_inputs(shape, dtype, device, eps=0.3) if norm == "linf" else make_l2_inputs(shape, dtype, device)


# --- the reference, against numbers worked out by hand --------------------------------------------


def test_linf_reference_by_hand():
    x_orig = torch.tensor([[0.5, 0.5, 0.5, 0.98]])
    x_adv = torch.tensor([[0.55, 0.55, 0.55, 0.98]])
    grad = torch.tensor([[2.0, -3.0, 0.0, 1.0]])
    out = pgd_step_reference(x_adv, grad, x_orig, alpha=0.1, eps=0.08, norm="linf")
    # +alpha then projected to x_orig + eps; -alpha; no step where grad is 0; clamped to upper = 1
    torch.testing.assert_close(out, torch.tensor([[0.58, 0.45, 0.55, 1.0]]))


def test_l2_reference_by_hand():
    x = torch.full((2, 2), 0.5)
    grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # unit direction (0.6, 0.8); zero gradient: no step
    out = pgd_step_reference(x, grad, x, alpha=0.1, eps=1.0, norm="l2")
    torch.testing.assert_close(out, torch.tensor([[0.56, 0.58], [0.5, 0.5]]))
    # a step longer than eps is shortened to the sphere of radius eps
    out = pgd_step_reference(x, grad, x, alpha=0.1, eps=0.05, norm="l2")
    torch.testing.assert_close(out, torch.tensor([[0.53, 0.54], [0.5, 0.5]]))


def torchattacks_linf(x_adv, grad, x_orig, alpha, eps):
    """The eager update sequence of torchattacks.PGD.forward."""
    adv = x_adv + alpha * grad.sign()
    delta = torch.clamp(adv - x_orig, min=-eps, max=eps)
    return torch.clamp(x_orig + delta, min=0, max=1)


def torchattacks_l2(x_adv, grad, x_orig, alpha, eps):
    """The eager update sequence of torchattacks.PGDL2.forward (eps_for_division = 1e-10)."""
    b = len(x_adv)
    grad_norms = torch.norm(grad.view(b, -1), p=2, dim=1) + 1e-10
    adv = x_adv + alpha * grad / grad_norms.view(b, 1, 1, 1)
    delta = adv - x_orig
    factor = torch.min(eps / torch.norm(delta.view(b, -1), p=2, dim=1), torch.ones(b))
    return torch.clamp(x_orig + delta * factor.view(-1, 1, 1, 1), min=0, max=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_reference_matches_torchattacks_sequence(norm):
    x_adv, grad, x_orig = make_inputs((5, 3, 6, 4), eps=0.3)
    eps, alpha = (0.03, 0.01) if norm == "linf" else (0.5, 0.2)
    expected = (torchattacks_linf if norm == "linf" else torchattacks_l2)(x_adv, grad, x_orig, alpha, eps)
    torch.testing.assert_close(pgd_step_reference(x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm), expected)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_sample_eps_and_alpha_equal_separate_calls(norm):
    x_adv, grad, x_orig = make_inputs((4, 2, 3, 3), eps=0.5)
    eps = torch.tensor([0.0, 0.05, 0.2, 1.0])
    alpha = torch.tensor([0.01, 0.3, 0.02, 0.0])
    out = pgd_step(x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm, backend="torch")
    for i in range(4):
        one = pgd_step_reference(
            x_adv[i : i + 1], grad[i : i + 1], x_orig[i : i + 1], alpha=alpha[i].item(), eps=eps[i].item(), norm=norm
        )
        torch.testing.assert_close(out[i : i + 1], one)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_result_stays_in_ball_and_box(norm, backend):
    x_adv, grad, x_orig = make_inputs((6, 3, 5, 5), device=triton_device() if backend == "triton" else "cpu", eps=0.6)
    eps, lower, upper = 0.25, 0.1, 0.9
    x_orig = x_orig.clamp(lower, upper)
    x = x_adv
    for _ in range(3):  # from outside the ball too: the first step projects back
        x = pgd_step(
            x, torch.randn_like(x), x_orig, alpha=0.2, eps=eps, norm=norm, lower=lower, upper=upper, backend=backend
        )
        delta = (x - x_orig).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps * (1 + 1e-5)).all()
        assert x.min() >= lower and x.max() <= upper


# --- the Triton kernels (interpreter on CPU, compiled on a GPU) against the reference -------------

SHAPES = [
    (3, 1, 7, 5),  # odd image
    (2, 5),  # flat features
    (1, 3, 4, 4),  # batch of one
    (2, 3, 80, 75),  # 18000 per sample: the two-pass L2 path
]


def triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_equals_reference(shape, norm, dtype):
    assert shape != SHAPES[-1] or shape[1] * shape[2] * shape[3] > triton_kernels.MAX_SAMPLE_IN_ONE_PROGRAM
    x_adv, grad, x_orig = inputs_for(norm, shape, dtype, device=triton_device())
    grad[0] = 0  # a sample with no gradient takes no L2 step
    eps, alpha = (0.1, 0.03) if norm == "linf" else (0.4, 0.3)
    expected = pgd_step_reference(x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm)
    out = pgd_step(x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm, backend="triton")
    assert out.dtype == dtype and out.shape == x_adv.shape
    torch.testing.assert_close(out, expected, **SPEC.tolerance(dtype))
    if dtype == torch.float32:
        assert_small_relative_error(out, expected, x_orig)


def assert_small_relative_error(out, expected, x_orig, rtol=1e-5):
    """Per sample, the error relative to the perturbation's size: on large samples an error in a
    per-sample reduction spreads thinly enough to pass an element-wise tolerance, not this one."""
    err = (out - expected).double().flatten(1).norm(dim=1)
    size = (expected - x_orig).double().flatten(1).norm(dim=1).clamp_min(1e-12)
    assert (err / size).max() < rtol, (err / size).max()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_triton_per_sample_eps_alpha(norm):
    x_adv, grad, x_orig = inputs_for(norm, (4, 2, 5, 3), device=triton_device())
    eps = torch.tensor([0.0, 0.05, 0.2, 1.0], device=x_adv.device)
    alpha = torch.tensor([0.01, 0.3, 0.02, 0.0], device=x_adv.device)
    expected = pgd_step_reference(x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm)
    out = pgd_step(x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm, backend="triton")
    torch.testing.assert_close(out, expected, **SPEC.tolerance(torch.float32))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_triton_channels_last_and_mixed_layouts(norm):
    x_adv, grad, x_orig = inputs_for(norm, (3, 3, 5, 7), device=triton_device())
    x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    x_orig = x_orig.contiguous(memory_format=torch.channels_last)
    # grad stays contiguous: the op must bring it to x_adv's layout, not misread it
    expected = pgd_step_reference(x_adv, grad, x_orig, alpha=0.05, eps=0.2, norm=norm)
    out = pgd_step(x_adv, grad, x_orig, alpha=0.05, eps=0.2, norm=norm, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, **SPEC.tolerance(torch.float32))
    # a non-dense view (every other column) is read correctly too
    wide = torch.rand(3, 3, 5, 14, device=x_adv.device)
    view = wide[..., ::2]
    expected = pgd_step_reference(view, grad, x_orig, alpha=0.05, eps=0.2, norm=norm)
    torch.testing.assert_close(
        pgd_step(view, grad, x_orig, alpha=0.05, eps=0.2, norm=norm, backend="triton"),
        expected,
        **SPEC.tolerance(torch.float32),
    )


def test_triton_opcheck():
    x_adv, grad, x_orig = make_inputs((3, 2, 4, 5), device=triton_device())
    eps = torch.full((3,), 0.1, device=x_adv.device)
    for args in [
        (x_adv, grad, x_orig, None, None, 0.1, 0.02, "linf", 0.0, 1.0),
        (x_adv, grad, x_orig, eps, None, 0.0, 0.02, "l2", 0.0, 1.0),
    ]:
        torch.library.opcheck(torch.ops.fastrob.pgd_step_triton.default, args)


# --- behaviour shared by all backends ------------------------------------------------------------


def available_backends():
    names = ["torch"]
    if torch.cuda.is_available() or _backend.triton_interpreter():
        names.append("triton")
    if torch.cuda.is_available() and _backend.status("cuda").available:
        names.append("cuda")
    return names


@pytest.mark.parametrize("backend", available_backends())
def test_result_is_detached_and_inputs_untouched(backend):
    device = "cuda" if backend == "cuda" else triton_device() if backend == "triton" else "cpu"
    x_adv, grad, x_orig = make_inputs((2, 1, 3, 3), device=device)
    x_adv.requires_grad_(True)
    before = [t.detach().clone() for t in (x_adv, grad, x_orig)]
    out = pgd_step(x_adv, grad, x_orig, alpha=0.1, eps=0.1, backend=backend)
    assert not out.requires_grad
    for t, b in zip((x_adv, grad, x_orig), before):
        assert torch.equal(t.detach(), b)


@pytest.mark.parametrize("backend", available_backends())
def test_zero_eps_and_empty_batch(backend):
    device = "cuda" if backend == "cuda" else triton_device() if backend == "triton" else "cpu"
    x = torch.rand(2, 4, device=device)
    out = pgd_step(x, torch.randn_like(x), x, alpha=0.5, eps=0.0, norm="l2", backend=backend)
    assert not out.isnan().any()
    torch.testing.assert_close(out, x)
    empty = torch.empty(0, 3, device=device)
    assert pgd_step(empty, empty, empty, alpha=0.1, eps=0.1, backend=backend).shape == (0, 3)


def test_auto_uses_the_reference_on_cpu():
    assert _backend.resolve("auto", torch.device("cpu"), torch.float32, op="pgd_step") == "torch"


def test_float64_runs_on_torch_and_auto():
    x_adv, grad, x_orig = make_inputs((2, 3, 2, 2), torch.float64)
    out = pgd_step(x_adv, grad, x_orig, alpha=0.01, eps=0.1, norm="l2")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, pgd_step_reference(x_adv, grad, x_orig, alpha=0.01, eps=0.1, norm="l2"))


# --- bad input -----------------------------------------------------------------------------------


def call(**overrides):
    x_adv, grad, x_orig = make_inputs((2, 1, 3, 3))
    kwargs = dict(x_adv=x_adv, grad=grad, x_orig=x_orig, alpha=0.1, eps=0.1)
    kwargs.update(overrides)
    x_adv, grad, x_orig = kwargs.pop("x_adv"), kwargs.pop("grad"), kwargs.pop("x_orig")
    return pgd_step(x_adv, grad, x_orig, **kwargs)


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(grad=torch.zeros(2, 1, 3, 4)), ValueError, "grad must have the shape"),
        (dict(x_orig=torch.zeros(3, 1, 3, 3)), ValueError, "x_orig must have the shape"),
        (dict(eps=-0.1), ValueError, "eps must be >= 0"),
        (dict(alpha=-1.0), ValueError, "alpha must be >= 0"),
        (dict(eps=math.nan), ValueError, "eps must be finite"),
        (dict(eps=torch.tensor([0.1, -0.2])), ValueError, "eps must be >= 0"),
        (dict(alpha=torch.ones(3)), ValueError, "alpha must be a number or a tensor of shape [batch]"),
        (dict(eps="0.1"), TypeError, "eps must be a real number"),
        (dict(norm="l1"), ValueError, "norm must be one of"),
        (dict(x_adv=torch.zeros(2, 1, 3, 3, dtype=torch.int64)), TypeError, "x_adv must be a floating-point"),
        (dict(grad=torch.zeros(2, 1, 3, 3, dtype=torch.float64)), TypeError, "grad must have the dtype of x_adv"),
        (
            dict(x_adv=torch.zeros(4), grad=torch.zeros(4), x_orig=torch.zeros(4)),
            ValueError,
            "x_adv must have at least 2",
        ),
        (dict(lower=1.0, upper=0.0), ValueError, "lower must be <= upper"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda'"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(")):
        call(**overrides)


def test_kernel_backends_refuse_float64():
    if not (torch.cuda.is_available() or _backend.triton_interpreter()):
        pytest.skip("triton cannot run here")
    x = torch.rand(2, 3, dtype=torch.float64, device=triton_device())
    with pytest.raises(TypeError, match="backend='triton' supports float32, float16, bfloat16; got float64"):
        pgd_step(x, x, x, alpha=0.1, eps=0.1, backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "status", lambda name: _backend.BackendStatus(name, True, "test"))
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        _backend.resolve("triton", torch.device("cpu"), torch.float32, op="pgd_step")


# --- GPU: every backend against the reference -----------------------------------------------------

GPU_SHAPES = [(3, 1, 7, 5), (64, 3, 32, 32), (5, 3, 64, 64), (4, 3, 224, 224), (2, 7)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_backends_equal_reference(backend, dtype, norm, shape, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4-d inputs")
    x_adv, grad, x_orig = inputs_for(norm, shape, dtype, device="cuda")
    if channels_last:
        x_adv, grad, x_orig = (t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad, x_orig))
    eps, alpha = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    per_sample = torch.linspace(0, 2 * eps, shape[0], device="cuda")
    for e in (eps, per_sample):
        expected = pgd_step_reference(x_adv, grad, x_orig, alpha=alpha, eps=e, norm=norm)
        out = pgd_step(x_adv, grad, x_orig, alpha=alpha, eps=e, norm=norm, backend=backend)
        torch.testing.assert_close(out, expected, **SPEC.tolerance(dtype))
        if dtype == torch.float32:
            assert_small_relative_error(out, expected, x_orig)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.cuda
def test_cuda_opcheck():
    x_adv, grad, x_orig = make_inputs((3, 2, 4, 5), device="cuda")
    for norm in ("linf", "l2"):
        torch.library.opcheck(
            torch.ops.fastrob.pgd_step_cuda.default, (x_adv, grad, x_orig, None, None, 0.1, 0.02, norm, 0.0, 1.0)
        )
