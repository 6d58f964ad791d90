"""fastrob.nn.BatchNormAct2d: batch norm then an activation, each on its fused op, against torch's
BatchNorm2d followed by the activation module (training and eval, running statistics, shared
parameters), and an input-gradient penalty's parameter gradients through it."""

import pytest
import torch
import torch.nn.functional as F
from op_checks import triton_device, triton_runs_here
from torch import nn

from fastrob.nn import BatchNorm2d, BatchNormAct2d

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="triton cannot run here")
TORCH_ACTS = {"silu": nn.SiLU, "relu": nn.ReLU, "hardswish": nn.Hardswish, "gelu_tanh": lambda: nn.GELU("tanh")}


@pytest.mark.parametrize("act", list(TORCH_ACTS))
def test_equals_batch_norm_then_the_activation(act):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    reference = nn.Sequential(bn, TORCH_ACTS[act]())
    fused = BatchNormAct2d.from_module(bn, act, backend="torch")
    assert isinstance(fused, BatchNorm2d) and fused.weight is bn.weight and fused.running_mean is bn.running_mean
    x = torch.randn(3, 4, 5, 5)
    expected = reference(x)
    mean_after_reference = bn.running_mean.clone()
    bn.running_mean.zero_(), bn.running_var.fill_(1.0), bn.num_batches_tracked.zero_()
    torch.testing.assert_close(fused(x), expected)
    torch.testing.assert_close(bn.running_mean, mean_after_reference)  # the shared buffers were updated
    fused.eval(), reference.eval()
    torch.testing.assert_close(fused(x), reference(x))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_input_gradient_penalty_parameter_gradients(backend):
    device = "cpu" if backend == "torch" else triton_device()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(), nn.Linear(16, 3))
    net = net.double().to(device)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64, device=device)
    y = torch.tensor([0, 1, 2, 0], device=device)

    def penalty_grads(model):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y), xi, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), list(model.parameters()))

    expected = penalty_grads(net)
    net[1] = BatchNormAct2d.from_module(net[1], "silu", backend=backend)
    net[2] = nn.Identity()
    for got, want in zip(penalty_grads(net), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_bad_activation_and_repr():
    with pytest.raises(ValueError, match="act must be one of"):
        BatchNormAct2d(3, act="tanh")
    assert "act='silu'" in repr(BatchNormAct2d(3, act="silu"))
