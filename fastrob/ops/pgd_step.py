"""The fused PGD step: ``pgd_step`` (dispatch), ``pgd_step_reference`` (the ground truth) and the
``fastrob::pgd_step_triton`` / ``fastrob::pgd_step_cuda`` custom ops behind it.

One projected step of projected gradient descent on the input, for each sample b:
  Linf: x_adv + alpha_b * sign(grad), projected onto the eps_b-ball around x_orig, then clamped
        to [lower, upper] (torchattacks' PGD order);
  L2:   x_adv + alpha_b * grad / ||grad||_2 (no step where the gradient is 0), delta = result -
        x_orig rescaled to norm <= eps_b, then clamped (torchattacks' PGDL2 order).
The step is an update rule, like an optimizer step: it is not differentiated through, and its
result never requires grad, whatever the backend.
"""

from __future__ import annotations

import torch

from fastrob import _backend
from fastrob._checks import check_float, check_like, check_tensor, per_sample_value
from fastrob.ops._common import accumulate_dtype, cuda_dtype_code, cuda_launch_context, per_sample_view, same_layout
from fastrob.ops._registry import FusedOp, SelfCheckCase, Tolerance, random_tensor, register

NORMS = ("linf", "l2")


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per sample, the size of ``delta`` [B, ...] in ``norm`` (one of ``NORMS``): max |δ_i| or ‖δ‖₂, shape [B]."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def pgd_step_reference(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_orig: torch.Tensor,
    *,
    alpha,
    eps,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
) -> torch.Tensor:
    """The plain-torch definition of the step (see the module docstring).

    Half-precision inputs are computed in float32 and rounded once, as the kernels do; float64
    stays float64. ``alpha`` and ``eps`` are floats or [B] tensors.
    """
    compute = accumulate_dtype(x_adv.dtype)
    xa, g, xo = x_adv.to(compute), grad.to(compute), x_orig.to(compute)
    alpha_b, eps_b = per_sample_view(alpha, xa), per_sample_view(eps, xa)
    if norm == "linf":
        x = xa + alpha_b * g.sign()
        delta = torch.clamp(x - xo, -eps_b, eps_b)
    elif norm == "l2":
        # The guards against zero norms act on per-sample scalars, not on whole tensors.
        shape = (-1,) + (1,) * (xa.dim() - 1)
        g_norm = g.flatten(1).norm(dim=1).view(shape)
        step = torch.where(g_norm > 0, alpha_b / g_norm.clamp_min(torch.finfo(compute).tiny), 0.0)
        delta = xa + step * g - xo
        d_norm = delta.flatten(1).norm(dim=1).view(shape)
        delta = delta * torch.where(d_norm > eps_b, eps_b / d_norm.clamp_min(torch.finfo(compute).tiny), 1.0)
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return torch.clamp(xo + delta, lower, upper).to(x_adv.dtype)


def pgd_step(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_orig: torch.Tensor,
    *,
    alpha,
    eps,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """One projected gradient step, fused into one kernel on the triton and cuda backends.

    Each input is read once and the result written once, except for L2 steps on samples of more
    than 16384 elements (8192 on Triton), which read the inputs twice (per-sample sums first, then the update).

    Args:
        x_adv: the current iterate, [B, ...] (NCHW images, or any shape with the batch first).
        grad: the gradient of the attack loss at ``x_adv`` (the ascent direction), same shape.
        x_orig: the clean inputs, centre of the eps-ball, same shape.
        alpha: step size, a float or a tensor of shape [B] (per sample), >= 0.
        eps: radius of the ball, a float or a tensor of shape [B], >= 0.
        norm: "linf" (sign step, box projection) or "l2" (normalised step, rescaling projection).
        lower, upper: the valid input range, applied last.
        backend: "auto" | "torch" | "triton" | "cuda" (see fastrob._backend).

    Returns:
        The next iterate, a new tensor of ``x_adv``'s shape, dtype and memory format (contiguous or
        channels_last), not requiring grad. float32, float16 and bfloat16 run on every backend
        (computed in float32); float64 runs on the torch backend.

    Raises:
        TypeError / ValueError naming the argument for bad input, RuntimeError when an explicitly
        requested backend cannot run here.
    """
    check_tensor("x_adv", x_adv, min_dim=2)
    check_tensor("grad", grad)
    check_tensor("x_orig", x_orig)
    check_like("grad", grad, "x_adv", x_adv)
    check_like("x_orig", x_orig, "x_adv", x_adv)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    lower, upper = check_float("lower", lower), check_float("upper", upper)
    if lower > upper:
        raise ValueError(f"lower must be <= upper, got lower={lower} > upper={upper}")
    batch = x_adv.shape[0]
    param_dtype = accumulate_dtype(x_adv.dtype)
    alpha = per_sample_value("alpha", alpha, batch, x_adv.device, dtype=param_dtype)
    eps = per_sample_value("eps", eps, batch, x_adv.device, dtype=param_dtype)
    name = _backend.resolve(backend, x_adv.device, x_adv.dtype, op="pgd_step")
    return pgd_step_unchecked(
        x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm, lower=lower, upper=upper, backend=name
    )


def pgd_step_unchecked(x_adv, grad, x_orig, *, alpha, eps, norm, lower, upper, backend):
    """``pgd_step`` without argument checks, for loops that checked once (the attacks).

    ``backend`` is a resolved name ("torch", "triton" or "cuda"); ``alpha``/``eps`` are floats or
    [B] tensors on the inputs' device (float32; float64 for float64 inputs), as ``per_sample_value``
    returns them.
    """
    x_adv, grad, x_orig = x_adv.detach(), grad.detach(), x_orig.detach()
    if backend == "torch":
        with torch.no_grad():
            return pgd_step_reference(x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm, lower=lower, upper=upper)
    x_adv, grad, x_orig = same_layout(x_adv, grad, x_orig)
    eps_t, eps_v = (eps, 0.0) if isinstance(eps, torch.Tensor) else (None, eps)
    alpha_t, alpha_v = (alpha, 0.0) if isinstance(alpha, torch.Tensor) else (None, alpha)
    op = torch.ops.fastrob.pgd_step_triton if backend == "triton" else torch.ops.fastrob.pgd_step_cuda
    return op(x_adv, grad, x_orig, eps_t, alpha_t, eps_v, alpha_v, norm, lower, upper)


# The fused backends as torch.library custom ops, so that they compose with torch.compile and
# pass torch.library.opcheck. Inputs arrive checked and in one batch-outermost layout.


@torch.library.custom_op("fastrob::pgd_step_triton", mutates_args=())
def _pgd_step_triton(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_orig: torch.Tensor,
    eps_per_sample: torch.Tensor | None,
    alpha_per_sample: torch.Tensor | None,
    eps: float,
    alpha: float,
    norm: str,
    lower: float,
    upper: float,
) -> torch.Tensor:
    from fastrob.triton import pgd_step as kernels  # imports triton only when first used
    from fastrob.triton._common import on_device_of

    out = torch.empty_like(x_adv)
    with on_device_of(x_adv):
        kernels.pgd_step(x_adv, grad, x_orig, out, eps_per_sample, alpha_per_sample, eps, alpha, norm, lower, upper)
    return out


@torch.library.custom_op("fastrob::pgd_step_cuda", mutates_args=(), device_types="cuda")
def _pgd_step_cuda(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_orig: torch.Tensor,
    eps_per_sample: torch.Tensor | None,
    alpha_per_sample: torch.Tensor | None,
    eps: float,
    alpha: float,
    norm: str,
    lower: float,
    upper: float,
) -> torch.Tensor:
    ext = _backend.extension()
    out = torch.empty_like(x_adv)
    batch = x_adv.shape[0]
    per_sample = x_adv.numel() // batch if batch else 0
    device, stream = cuda_launch_context(x_adv)
    workspace = None
    if norm == "l2":
        floats = ext.pgd_step_l2_workspace_floats(batch, per_sample)
        if floats:
            workspace = torch.empty(floats, device=x_adv.device, dtype=torch.float32)
    step = ext.pgd_step_linf if norm == "linf" else ext.pgd_step_l2
    step(
        x_adv.data_ptr(),
        grad.data_ptr(),
        x_orig.data_ptr(),
        out.data_ptr(),
        eps_per_sample.data_ptr() if eps_per_sample is not None else 0,
        alpha_per_sample.data_ptr() if alpha_per_sample is not None else 0,
        eps,
        alpha,
        lower,
        upper,
        batch,
        per_sample,
        cuda_dtype_code(x_adv.dtype),
        device,
        stream,
        workspace.data_ptr() if workspace is not None else 0,
    )
    return out


@_pgd_step_triton.register_fake
def _(x_adv, grad, x_orig, eps_per_sample, alpha_per_sample, eps, alpha, norm, lower, upper):
    return torch.empty_like(x_adv)


@_pgd_step_cuda.register_fake
def _(x_adv, grad, x_orig, eps_per_sample, alpha_per_sample, eps, alpha, norm, lower, upper):
    return torch.empty_like(x_adv)


def _self_check_cases(device, dtype):
    """Linf with per-sample eps, L2 in one program per sample (one sample with a tiny gradient, whose
    step needs its norm's clamp to be a normal float) and L2 in two passes (samples of more than
    16384 elements, 8192 on Triton)."""

    def case(shape, norm, seed, grad_scale=None):
        x_orig = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x_adv = (x_orig + 0.02 * random_tensor(shape, "cpu", torch.float64, seed + 1)).clamp(0, 1)
        grad = random_tensor(shape, "cpu", torch.float64, seed + 2)
        if grad_scale is not None:
            grad = grad * grad_scale.view(-1, *([1] * (len(shape) - 1)))
        inputs = [t.to(device=device, dtype=dtype) for t in (x_adv, grad, x_orig)]
        kw = dict(alpha=0.05, eps=torch.linspace(0.01, 0.5, shape[0], device=device), norm=norm)
        return SelfCheckCase(
            lambda b: lambda xa, g, xo: pgd_step(xa, g, xo, **kw, backend=b),
            lambda xa, g, xo: pgd_step_reference(xa, g, xo, **kw),
            inputs,
        )

    yield case((3, 2, 4, 4), "linf", 10)
    yield case((3, 3, 5, 5), "l2", 20, torch.tensor([1.0, 1e-18, 3.0], dtype=torch.float64))
    yield case((2, 16400), "l2", 30)


# Storage rounding: both sides compute in float32 and round once, but the Triton interpreter and CUDA
# may round half types differently by one unit in the last place (2^-10 for float16, 2^-7 for bfloat16).
SPEC = register(
    FusedOp(
        name="pgd_step",
        tolerances={
            torch.float32: Tolerance(1e-6, 1e-5),
            torch.float64: Tolerance(1e-12, 1e-12),
            torch.float16: Tolerance(2**-10, 0.0),
            torch.bfloat16: Tolerance(2**-7, 0.0),
        },
        self_check_cases=_self_check_cases,
        differentiable=False,
    )
)
