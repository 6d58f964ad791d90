"""fastrob.ops.batch_norm and fastrob.nn.BatchNorm2d: the reference against a by-hand formula and
torch, every backend's value and first and second derivatives against the reference (training
and eval, with and without affine parameters, NCHW and channels_last, odd shapes), running
statistics against torch's, float64 gradcheck/gradgradcheck, opcheck, errors, the module against
torch.nn.BatchNorm2d (state_dict both ways, momentum None, swap/patch helpers), and a gradient
penalty's parameter gradient through a BN net."""

import pytest
import torch
import torch.nn.functional as F
from op_checks import assert_derivatives_close, triton_device, triton_runs_here
from torch import nn

from fastrob.nn import BatchNorm2d, BiasAct, patch_model, swap_batch_norm
from fastrob.ops import batch_norm, batch_norm_reference
from fastrob.ops.batch_norm import SPEC

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="triton cannot run here")


def make(shape, dtype=torch.float32, device="cpu", seed=0, channels_last=False, offset=3.0):
    """x (mean ``offset``, std 2: data away from 0, as after a ReLU), weight, bias, running stats.
    Seeded apart from op_checks' cotangents (seed s there): with the same draws the cotangent would
    be an affine function of x, whose BN input gradient is 0, and the first derivatives untested."""
    g = torch.Generator().manual_seed(1000 + seed)
    c = shape[1]
    x = (2 * torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, rm = (torch.randn(c, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3))
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    return x, w, b, rm, rv


def by_hand(x, w, b, eps=1e-5):
    """Training-mode batch norm of a 4-d x from its definition, loops over channels."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        v = x[:, c]
        mean = v.sum() / v.numel()
        var = ((v - mean) ** 2).sum() / v.numel()
        out[:, c] = (v - mean) / (var + eps).sqrt() * w[c] + b[c]
    return out


def fn_of(op, training, affine, rm, rv, **kw):
    """op(x, weight, bias) as a function of the differentiable inputs, fresh running stats per call."""

    def fn(x, *params):
        w, b = params if affine else (None, None)
        return op(
            x, w, b, rm.clone() if rm is not None else None, rv.clone() if rv is not None else None, training, **kw
        )

    return fn


def test_reference_by_hand_and_against_torch():
    x, w, b, rm, rv = make((3, 4, 5, 2), torch.float64)
    torch.testing.assert_close(batch_norm_reference(x, w, b, None, None, True), by_hand(x, w, b))
    for training in (True, False):
        assert_derivatives_close(
            fn_of(batch_norm_reference, training, True, rm, rv),
            lambda x, w, b: F.batch_norm(x, rm.clone(), rv.clone(), w, b, training),
            [x, w, b],
            **SPEC.tolerance(torch.float64),
        )


SHAPES = [(3, 5, 7, 3), (2, 3, 1, 1), (6, 4), (2, 70, 1, 3), (2, 3, 4, 5, 2)]  # 70: two channel blocks


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_equals_reference(shape, dtype, training):
    for channels_last in [False, True] if len(shape) == 4 else [False]:
        x, w, b, rm, rv = make(shape, dtype, triton_device(), channels_last=channels_last)
        for affine in (True, False):
            inputs = [x, w, b] if affine else [x]
            assert_derivatives_close(
                fn_of(batch_norm, training, affine, rm, rv, backend="triton"),
                fn_of(batch_norm_reference, training, affine, rm, rv),
                inputs,
                **SPEC.tolerance(dtype),
            )
        out = batch_norm(x, w, b, rm, rv, training, backend="triton")
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert out.dtype == x.dtype and out.is_contiguous(memory_format=layout)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_half_precision(dtype):
    """Value and first derivatives (computed in float32, rounded once) within half-precision
    rounding of the reference; running statistics stay in their own dtype."""
    x, w, b, rm, rv = make((4, 6, 5, 3), dtype, triton_device(), channels_last=True)
    for training in (True, False):

        def value_and_grads(op, **kw):
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
            out = op(*leaves, rm.clone(), rv.clone(), training, **kw)
            gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
            return [out, *torch.autograd.grad(out, leaves, gy)]

        for a, e in zip(value_and_grads(batch_norm, backend="triton"), value_and_grads(batch_norm_reference)):
            assert a.dtype == e.dtype
            torch.testing.assert_close(a.float(), e.float(), **SPEC.tolerance(dtype))


@needs_triton
def test_far_from_zero_data_keeps_float32_accuracy():
    """Shifted sums: a channel at mean 1e4 with std 1 normalises as accurately as one at 0
    (sum(x^2) / M - mean^2 in float32 would lose every digit of the variance)."""
    x, w, b, _, _ = make((8, 3, 6, 6), offset=1e4)
    expected = batch_norm_reference(x.double(), w.double(), b.double(), None, None, True)
    torch.testing.assert_close(
        batch_norm(x, w, b, None, None, True, backend="triton").double(), expected, atol=2e-3, rtol=0
    )


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_running_statistics_equal_torch(backend, channels_last):
    x, w, b, rm, rv = make((5, 4, 3, 3), channels_last=channels_last)
    rm_t, rv_t = rm.clone(), rv.clone()
    for step in range(3):
        xs = x + step
        batch_norm(xs, w, b, rm, rv, True, 0.3, 1e-3, backend=backend)
        F.batch_norm(xs, rm_t, rv_t, w, b, True, 0.3, 1e-3)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)
    batch_norm(x, w, b, rm, rv, False, backend=backend)  # eval leaves them alone
    torch.testing.assert_close(rm, rm_t)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck_float64(backend, training):
    x, w, b, rm, rv = make((3, 2, 2, 1), torch.float64, "cpu" if backend == "torch" else triton_device())
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b))
    fn = fn_of(batch_norm, training, True, rm, rv, backend=backend)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@needs_triton
def test_opcheck():
    x, w, b, rm, rv = make((2, 3, 4, 5), device=triton_device())
    gy, v = torch.randn_like(x), torch.randn_like(x)
    y, mean, invstd = torch.ops.fastrob.batch_norm_triton(x, w, b, 1e-5)
    ops = torch.ops.fastrob
    for weight, bias in ((w, b), (None, None)):
        torch.library.opcheck(ops.batch_norm_triton.default, (x, weight, bias, 1e-5))
        torch.library.opcheck(ops.batch_norm_backward_triton.default, (gy, x, weight, mean, invstd))
        torch.library.opcheck(
            ops.batch_norm_double_backward_triton.default,
            (gy, x, weight, mean, invstd, v, torch.randn(3), torch.randn(3)),
        )
        torch.library.opcheck(ops.batch_norm_eval_triton.default, (x, weight, bias, rm, rv, 1e-5))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(x=torch.zeros(4, dtype=torch.float32)), ValueError, "x must have at least 2 dimensions"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "x must be a floating-point"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \[channels\] = \(3,\)"),
        (dict(running_var=torch.ones(3, 1)), ValueError, "running_var must have shape"),
        (dict(bias=torch.ones(3, dtype=torch.int32)), TypeError, "bias must be a floating-point"),
        (
            dict(training=False, running_mean=None, running_var=None),
            ValueError,
            "running_mean and running_var must be given",
        ),
        (dict(running_mean=None), ValueError, "must both be None or both be given"),
        (dict(training=1), TypeError, "training must be a bool"),
        (dict(momentum=float("nan")), ValueError, "momentum"),
        (dict(eps=-1e-5), ValueError, "eps"),
        (dict(x=torch.zeros(1, 3, 1, 1)), ValueError, "more than one value per channel"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda'"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, words):
    args = dict(
        x=torch.zeros(2, 3, 4),
        weight=None,
        bias=None,
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        training=True,
    )
    args.update(kwargs)
    with pytest.raises(error, match=words):
        batch_norm(**args)


# ---- the module -----------------------------------------------------------------------------


def torch_and_fastrob(backend="torch", **kw):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, **kw)
    ours = BatchNorm2d(5, **kw, backend=backend)
    if ref.affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(momentum=0.5, eps=1e-3)],
    ids=str,
)
def test_module_equals_torch_batchnorm(backend, kw):
    ref, ours = torch_and_fastrob(backend, **kw)
    assert isinstance(ours, nn.BatchNorm2d)
    device = triton_device() if backend == "triton" else "cpu"
    ours.to(device)
    for step in range(3):
        x = make((4, 5, 3, 2), seed=step)[0]
        torch.testing.assert_close(ours(x.to(device)).cpu(), ref(x), **SPEC.tolerance(torch.float32))
    for (name, a), (_, e) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a.cpu(), e, msg=lambda m: f"{name}: {m}")  # running stats, num_batches_tracked
    ours.eval()
    ref.eval()
    x = make((2, 5, 3, 3), seed=9)[0]
    torch.testing.assert_close(ours(x.to(device)).cpu(), ref(x), **SPEC.tolerance(torch.float32))


def test_module_state_dict_round_trip_both_ways():
    ref, ours = torch_and_fastrob(momentum=None)
    ref(make((4, 5, 3, 3))[0])
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = nn.BatchNorm2d(5)
    ours.load_state_dict(ref.state_dict())
    back.load_state_dict(ours.state_dict())  # strict: same keys
    for a, e in zip(back.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, e)
    with pytest.raises(ValueError, match="expected 4D input"):
        ours(torch.zeros(2, 5))


def test_swap_batch_norm_shares_parameters_and_keeps_the_function():
    torch.manual_seed(0)
    sync, bn1d = nn.SyncBatchNorm(4), nn.BatchNorm1d(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.BatchNorm2d(4, momentum=None)),
        sync,
        nn.Sequential(bn1d),
    )
    model[0:3].train()(torch.randn(4, 3, 6, 6))  # running statistics away from their initial values
    model.eval()
    weight, running_mean = model[1].weight, model[1].running_mean
    x = torch.randn(2, 3, 6, 6)
    expected = model[:3](x)
    swap_batch_norm(model, backend="torch")
    assert type(model[1]) is BatchNorm2d and type(model[2][0]) is BatchNorm2d
    assert model[2][0].momentum is None and not model[1].training
    assert model[1].weight is weight and model[1].running_mean is running_mean
    assert model[3] is sync and model[4][0] is bn1d  # SyncBatchNorm and 1-d BN stay
    torch.testing.assert_close(model[:3](x), expected)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        swap_batch_norm(lambda x: x)


def test_patch_model_swaps_both():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    patch_model(model, act="softplus")
    assert type(model[1]) is BatchNorm2d and isinstance(model[2], BiasAct) and model[2].act == "softplus"
    model = patch_model(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), batch_norm=False)
    assert type(model[0]) is nn.BatchNorm2d and isinstance(model[1], BiasAct)
    with pytest.raises(TypeError, match="batch_norm must be a bool"):
        patch_model(model, batch_norm="yes")


def bn_net(bn):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        bn(4),
        nn.Softplus(),
        nn.Conv2d(4, 6, 3, stride=2),
        bn(6),
        nn.Softplus(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10),
    ).double()


@needs_triton
def test_input_gradient_penalty_parameter_gradients_through_bn(digits):
    """The exact input-gradient penalty ||d sum CE / dx||^2 (explicit double backprop): its value and
    its gradient in every parameter, through train-mode BN, equal with fastrob's BN (Triton) and
    torch's."""
    x = digits.x_train[:12].double().to(triton_device())
    y = digits.y_train[:12].long().to(triton_device())

    def penalty_and_grads(model):
        model = model.to(triton_device()).train()
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr, create_graph=True)
        penalty = g.pow(2).sum()
        return [penalty, *torch.autograd.grad(penalty, list(model.parameters()))]

    ours = penalty_and_grads(bn_net(lambda c: BatchNorm2d(c, backend="triton")))
    ref = penalty_and_grads(bn_net(nn.BatchNorm2d))
    assert ours[0] > 0
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(128, 64, 32, 32), (128, 256, 8, 8), (3, 5, 7, 3), (6, 4)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_backends_equal_reference(backend, dtype, shape, channels_last, training):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4-d inputs")
    x, w, b, rm, rv = make(shape, dtype, "cuda", channels_last=channels_last)
    if dtype == torch.float32:
        assert_derivatives_close(
            fn_of(batch_norm, training, True, rm, rv, backend=backend),
            fn_of(batch_norm_reference, training, True, rm, rv),
            [x, w, b],
            **SPEC.tolerance(torch.float32),
        )
    else:
        out = batch_norm(x, w, b, rm.clone(), rv.clone(), training, backend=backend)
        torch.testing.assert_close(
            out.float(),
            batch_norm_reference(x, w, b, rm.clone(), rv.clone(), training).float(),
            **SPEC.tolerance(dtype),
        )
    rm_a, rv_a, rm_e, rv_e = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    batch_norm(x, w, b, rm_a, rv_a, training, backend=backend)
    batch_norm_reference(x, w, b, rm_e, rv_e, training)
    torch.testing.assert_close(rm_a.float(), rm_e.float(), **SPEC.tolerance(dtype))
    torch.testing.assert_close(rv_a.float(), rv_e.float(), **SPEC.tolerance(dtype))


@pytest.mark.cuda
def test_cuda_second_derivatives_float32_against_the_float64_reference():
    """CUDA kernels run float32/half only: a float32 double-derivative check at a small shape
    against the float64 reference."""
    x, w, b, rm, rv = make((3, 5, 7, 3), torch.float32, "cuda")
    assert_derivatives_close(
        fn_of(batch_norm, True, True, rm, rv, backend="cuda"),
        lambda x, w, b: batch_norm_reference(x.double(), w.double(), b.double(), None, None, True).float(),
        [x, w, b],
        **SPEC.tolerance(torch.float32),
    )


# ---- edge cases a review found ------------------------------------------------------------------


@needs_triton
def test_non_contiguous_weight_bias_and_one_of_them():
    x, w, b, rm, rv = make((4, 3, 5, 2), device=triton_device())
    wide_w, wide_b = torch.stack([w, -w], 1).flatten(), torch.stack([b, -b], 1).flatten()  # [6], strided views below
    for weight, bias in ((wide_w[::2], wide_b[::2]), (w, None), (None, b)):
        for training in (True, False):
            got = batch_norm(x, weight, bias, rm.clone(), rv.clone(), training, backend="triton")
            want = F.batch_norm(x, rm.clone(), rv.clone(), weight, bias, training)
            torch.testing.assert_close(got, want, **SPEC.tolerance(torch.float32))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_batch_and_constant_channel(backend):
    device = "cpu" if backend == "torch" else triton_device()
    _, w, b, rm, rv = make((2, 3, 4, 4), device=device)
    empty = torch.zeros(0, 3, 4, 4, device=device)
    r_mean, r_var = rm.clone(), rv.clone()
    assert batch_norm(empty, w, b, r_mean, r_var, True, backend=backend).shape == empty.shape
    assert torch.equal(r_mean, rm) and torch.equal(r_var, rv)  # statistics untouched, as torch
    x = torch.rand(4, 3, 5, 5, device=device)
    x[:, 1] = 0.7  # a constant channel: its batch variance is exactly 0
    r_mean, r_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    ref_mean, ref_var = r_mean.clone(), r_var.clone()
    batch_norm(x, w, b, r_mean, r_var, True, momentum=1.0, backend=backend)
    F.batch_norm(x, ref_mean, ref_var, w, b, True, momentum=1.0)
    assert float(r_var[1]) >= 0
    torch.testing.assert_close(r_var, ref_var, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r_mean, ref_mean)


def test_swap_keeps_hooks_and_swaps_a_bare_module():
    calls = []
    bn = nn.BatchNorm2d(3)
    bn.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    model = swap_batch_norm(nn.Sequential(bn))
    model(torch.rand(2, 3, 4, 4))
    assert isinstance(model[0], BatchNorm2d) and calls == [(2, 3, 4, 4)]
    assert sorted(n for n, _ in model[0].named_parameters()) == ["bias", "weight"]  # no stray fresh tensors
    bare = swap_batch_norm(nn.BatchNorm2d(3))
    assert isinstance(bare, BatchNorm2d)
    assert isinstance(patch_model(nn.ReLU(), act="softplus"), BiasAct)
