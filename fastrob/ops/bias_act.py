"""Fused bias + activation with first- and second-derivative kernels (stylegan2-ada's bias_act
pattern): ``bias_act`` (dispatch), ``bias_act_reference`` and the ``fastrob::bias_act_{triton,cuda}``
custom ops.

    y = f(x + b),  dx = dy f'(x + b),  and the backward is an op whose backward
    (d_dy = V f', d_x = V dy f'') is one fused kernel; db sums dx over the non-bias dimensions.

f is one of relu, softplus, gelu, silu and half_huber (the half-Huber ReLU of Woods et al. 2019,
docs/methods.md#adversarial-explanations): every one but relu has a non-zero second derivative, which
is what lets a gradient penalty's parameter gradient see the activation's curvature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrob._checks import check_float, check_positive, check_tensor, dtype_name
from fastrob.ops._common import accumulate_dtype, batch_outermost_dense, define_op, launch, resolve_backend, same_layout
from fastrob.ops._registry import FusedOp, SelfCheckCase, Tolerance, random_tensor, register

# codes shared with the kernels (fastrob/triton/bias_act.py, kernels/bias_act.cuh)
ACTIVATIONS = {"relu": 0, "softplus": 1, "gelu": 2, "silu": 3, "half_huber": 4}


def half_huber(u: torch.Tensor, d: float = 0.5) -> torch.Tensor:
    """0 for u < 0, u^2 / (2 d) on [0, d], u - d / 2 above (Woods et al. 2019, d = 0.5)."""
    return torch.where(u <= 0, torch.zeros_like(u), torch.where(u <= d, u * u / (2 * d), u - d / 2))


def activation_reference(
    u: torch.Tensor, act: str, *, beta: float = 1.0, threshold: float = 20.0, d: float = 0.5
) -> torch.Tensor:
    if act == "relu":
        return F.relu(u)
    if act == "softplus":
        return F.softplus(u, beta=beta, threshold=threshold)
    if act == "gelu":
        return F.gelu(u)
    if act == "silu":
        return F.silu(u)
    return half_huber(u, d)


def check_act_params(beta, threshold, d) -> tuple[float, float, float]:
    """softplus's beta (> 0) and threshold, half_huber's d (> 0), as floats."""
    return check_positive("beta", beta), check_float("threshold", threshold), check_positive("d", d)


def bias_act_reference(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "relu",
    dim: int = 1,
    *,
    beta: float = 1.0,
    threshold: float = 20.0,
    d: float = 0.5,
) -> torch.Tensor:
    """f(x + bias) with bias broadcast along ``dim``, computed in float32 for half-precision input
    (as the kernels) and returned in x's dtype."""
    compute = accumulate_dtype(x.dtype)
    u = x.to(compute)
    if bias is not None:
        u = u + bias.to(compute).view([-1 if i == dim % x.dim() else 1 for i in range(x.dim())])
    return activation_reference(u, act, beta=beta, threshold=threshold, d=d).to(x.dtype)


def bias_act(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "relu",
    dim: int = 1,
    *,
    beta: float = 1.0,
    threshold: float = 20.0,
    d: float = 0.5,
    backend: str = "auto",
) -> torch.Tensor:
    """y = act(x + bias), bias broadcast along ``dim``; differentiable twice on every backend.

    Args:
        x: floating-point tensor (NCHW, channels_last or any shape).
        bias: None or a 1-d tensor of x.shape[dim] elements, x's dtype and device.
        act: "relu" | "softplus" | "gelu" (erf form) | "silu" | "half_huber".
        dim: the dimension the bias runs along (channels: 1).
        beta, threshold: softplus's parameters (as torch.nn.Softplus).
        d: the width of half_huber's quadratic piece, > 0 (default 0.5, Woods et al.).
        backend: "auto" | "torch" | "triton" | "cuda". Triton runs float64 too.

    Returns:
        A tensor of x's shape, dtype and memory format (contiguous or channels_last).
    """
    check_tensor("x", x, min_dim=0)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"dim must be an int indexing the {x.dim()} dimensions of x, got {dim!r}")
    if bias is None:
        dim = 0  # without a bias the dimension plays no part (a BiasAct may see inputs of any rank)
        if x.dim() == 0:  # the kernels index a dense array: give a scalar one dimension
            return bias_act(x.reshape(1), None, act, 0, beta=beta, threshold=threshold, d=d, backend=backend).reshape(
                ()
            )
    elif not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int indexing the {x.dim()} dimensions of x, got {dim!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
    dim %= x.dim()
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (x.shape[dim],):
            raise ValueError(f"bias must have shape [x.shape[dim]] = ({x.shape[dim]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have the dtype of x ({dtype_name(x.dtype)}), got {dtype_name(bias.dtype)}")
        if bias.device != x.device:
            raise ValueError(f"bias must be on the device of x ({x.device}), got {bias.device}")
    beta, threshold, d = check_act_params(beta, threshold, d)
    name = resolve_backend(backend, x, op="bias_act")
    if name == "torch":
        return bias_act_reference(x, bias, act, dim, beta=beta, threshold=threshold, d=d)
    if not batch_outermost_dense(x):
        x = x.contiguous()
    return _OPS[name](x, bias.contiguous() if bias is not None else None, ACTIVATIONS[act], dim, beta, threshold, d)


def _triton_kernels():
    """fastrob/triton/bias_act.py, imported when a Triton kernel first runs (not by ``import fastrob``)."""
    from fastrob.triton import bias_act as kernels

    return kernels


def _build(backend: str):
    """forward, backward and double-backward ops of one fused backend, wired for autograd."""
    device_types = "cuda" if backend == "cuda" else None

    def geometry(x, dim):
        """(elements, stride of the bias dimension, channels) of a dense x."""
        return x.numel(), x.stride(dim), x.shape[dim]

    def dense(x):
        return x if batch_outermost_dense(x) else x.contiguous()

    def forward(
        x: torch.Tensor, bias: torch.Tensor | None, act: int, dim: int, beta: float, threshold: float, d: float
    ) -> torch.Tensor:
        x = dense(x)
        y = torch.empty_like(x)
        n, stride_c, channels = geometry(x, dim)
        launch(
            backend,
            lambda: _triton_kernels().bias_act_forward,
            "bias_act_forward",
            (x, bias, y),
            (n,),
            (stride_c, channels, act, beta, threshold, d),
        )
        return y

    def backward(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        act: int,
        dim: int,
        beta: float,
        threshold: float,
        d: float,
    ) -> torch.Tensor:
        x = dense(x)
        (dy,) = same_layout(x, grad_y)[1:]
        dx = torch.empty_like(x)
        n, stride_c, channels = geometry(x, dim)
        launch(
            backend,
            lambda: _triton_kernels().bias_act_backward,
            "bias_act_backward",
            (dy, x, bias, dx),
            (n,),
            (stride_c, channels, act, beta, threshold, d),
        )
        return dx

    def double_backward(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        grad_grad: torch.Tensor,
        act: int,
        dim: int,
        beta: float,
        threshold: float,
        d: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = dense(x)
        dy, v = same_layout(x, grad_y, grad_grad)[1:]
        d_dy, d_x = torch.empty_like(x), torch.empty_like(x)
        n, stride_c, channels = geometry(x, dim)
        launch(
            backend,
            lambda: _triton_kernels().bias_act_double_backward,
            "bias_act_double_backward",
            (dy, x, bias, v, d_dy, d_x),
            (n,),
            (stride_c, channels, act, beta, threshold, d),
        )
        return d_dy, d_x

    fwd = define_op(
        f"bias_act_{backend}", forward, lambda x, b, *args: torch.empty_like(dense(x)), device_types=device_types
    )
    bwd = define_op(
        f"bias_act_backward_{backend}",
        backward,
        lambda dy, x, b, *args: torch.empty_like(dense(x)),
        device_types=device_types,
    )
    dbl = define_op(
        f"bias_act_double_backward_{backend}",
        double_backward,
        lambda dy, x, b, v, *args: (torch.empty_like(dense(x)), torch.empty_like(dense(x))),
        device_types=device_types,
    )

    def bias_grad(ctx, g):
        """The bias's gradient: g summed over every dimension but the bias's."""
        if not ctx.has_bias:
            return None
        return g.sum([i for i in range(g.dim()) if i != ctx.params[1]])

    def setup_forward(ctx, inputs, output):
        x, bias, *ctx.params = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, bias)

    def backward_of_forward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        dx = bwd(grad_y, x, bias, *ctx.params)
        return dx, bias_grad(ctx, dx), None, None, None, None, None

    def setup_backward(ctx, inputs, output):
        grad_y, x, bias, *ctx.params = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(grad_y, x, bias)

    def backward_of_backward(ctx, grad_grad):
        grad_y, x, bias = ctx.saved_tensors
        d_dy, d_x = dbl(grad_y, x, bias, grad_grad, *ctx.params)
        return d_dy, d_x, bias_grad(ctx, d_x), None, None, None, None, None

    fwd.register_autograd(backward_of_forward, setup_context=setup_forward)
    bwd.register_autograd(backward_of_backward, setup_context=setup_backward)
    return fwd


_OPS = {backend: _build(backend) for backend in ("triton", "cuda")}


def _self_check_cases(device, dtype):
    x, bias = random_tensor((2, 3, 5), device, dtype, 3), random_tensor((3,), device, dtype, 4)
    for act in ("relu", "gelu"):
        yield SelfCheckCase(
            lambda b, act=act: lambda t, c: bias_act(t, c, act, backend=b),
            lambda t, c, act=act: bias_act_reference(t, c, act),
            [x, bias],
        )


SPEC = register(
    FusedOp(
        name="bias_act",
        tolerances={
            torch.float32: Tolerance(1e-5, 1e-5),
            torch.float64: Tolerance(1e-12, 1e-12),
            torch.float16: Tolerance(2e-3, 2e-3),
            torch.bfloat16: Tolerance(2e-2, 2e-2),
        },
        self_check_cases=_self_check_cases,
        # the bias gradient sums 1e5 float32 terms in another order than torch's
        large_input_tolerances={torch.float32: Tolerance(1e-4, 1e-4)},
    )
)
