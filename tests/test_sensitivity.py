"""Neuron sensitivity and the SNS regularizer (Zhang, Liu et al. 2019): sigma against a per-sample, per-channel
brute force, layer choice, top-k, hooks removed after success and after an exception, the SNS
objective and its parameter gradients against brute force (float64), and the digits claim: an
adversarially trained model has lower mean neuron sensitivity than a plain one, SNS lower still."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_functional import assert_same_grads, param_grads
from train_loop import fit

from fastrob.adversarial_training import adversarial_loss
from fastrob.attacks import PGD, pgd
from fastrob.metrics.sensitivity import (
    default_layers,
    neuron_sensitivity,
    neuron_sensitivity_metric,
    top_k_count,
    top_k_sensitive,
)
from fastrob.models import MLP
from fastrob.regularizers.sns import SNSRegularizer


def tiny_cnn(bn=False, seed=0):
    torch.manual_seed(seed)
    layers = (
        [nn.Conv2d(2, 5, 3, padding=1)]
        + ([nn.BatchNorm2d(5)] if bn else [])
        + [
            nn.Softplus(),
            nn.Conv2d(5, 6, 3, stride=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(24, 7),
            nn.Softplus(),
            nn.Linear(7, 4),
        ]
    )
    return nn.Sequential(*layers).double()


def brute_features(model, x):
    """Every layer's output of a Sequential, computed layer by layer: {index name: tensor}."""
    out, h = {}, x
    for name, layer in model.named_children():
        h = layer(h)
        out[name] = h
    return out


def brute_sigma(model, x, x_adv, names):
    """sigma(l, c) = (1/N) sum_k ||F_lc(x'_k) - F_lc(x_k)||_1 / dim, one sample and channel at a time."""
    with torch.no_grad():
        return _brute_sigma(model, x, x_adv, names)


def _brute_sigma(model, x, x_adv, names):
    sigma = {}
    for name in names:
        per_sample = []
        for k in range(x.shape[0]):
            f = brute_features(model, x[k : k + 1])[name][0]
            fa = brute_features(model, x_adv[k : k + 1])[name][0]
            per_sample.append(torch.stack([(fa[c] - f[c]).abs().sum() / fa[c].numel() for c in range(f.shape[0])]))
        sigma[name] = torch.stack(per_sample).mean(0)
    return sigma


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def batch(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 6, 6, generator=g, dtype=torch.float64)
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, x_adv, y


# ---- neuron sensitivity ---------------------------------------------------------------------------


@pytest.mark.parametrize("bn", [False, True])
def test_sigma_equals_brute_force(bn):
    model = tiny_cnn(bn).train()
    if bn:  # non-trivial running statistics: the metric must use them (eval mode)
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.2, 0.2)
            model[1].running_var.uniform_(0.5, 1.5)
    x, x_adv, _ = batch()
    result = neuron_sensitivity(model, x, x_adv, batch_size=3)  # 3 batches, the last one short
    acts = ["2", "4", "7"] if bn else ["1", "3", "6"]
    assert list(result.keys()) == acts  # the activation modules, in forward order
    expected = brute_sigma(model.eval(), x, x_adv, acts)
    model.train()
    for name in acts:
        torch.testing.assert_close(result[name], expected[name], rtol=1e-10, atol=1e-14)
    assert result.n == 7 and model.training and no_hooks(model)
    means = {n: float(expected[n].mean()) for n in acts}
    assert result.layer_means == pytest.approx(means)
    assert result.mean == pytest.approx(sum(means.values()) / 3)
    d = result.as_dict()
    assert d["channels"] == {acts[0]: 5, acts[1]: 6, acts[2]: 7} and d["mean"] == pytest.approx(result.mean)
    # named layers, pre-activation: conv outputs
    named = neuron_sensitivity(model, x, x_adv, layers=["0", model[3 if bn else 2]])
    brute = brute_sigma(model.eval(), x, x_adv, ["0", "3" if bn else "2"])
    for name in brute:
        torch.testing.assert_close(named[name], brute[name], rtol=1e-10, atol=1e-14)


def test_default_layers_and_shared_modules():
    assert default_layers(tiny_cnn()) == ["1", "3", "6"]
    linear_only = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 2))
    assert default_layers(linear_only) == ["1"]  # Conv/Linear but the logits layer
    assert default_layers(MLP((1, 4, 4), 3, hidden=(5, 6))) == ["2", "4"]  # fastrob's BiasAct counts

    class Shared(nn.Module):  # one ReLU module called twice, as in torchvision's ResNet blocks
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.head(self.relu(self.b(self.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Shared()
    x = torch.rand(5, 4)
    x_adv = x + 0.3
    r = neuron_sensitivity(model, x, x_adv)
    assert list(r.keys()) == ["relu", "relu#1"]
    with torch.no_grad():
        h1, h1a = F.relu(model.a(x)), F.relu(model.a(x_adv))
        h2, h2a = F.relu(model.b(h1)), F.relu(model.b(h1a))
    assert r["relu"].dtype == torch.float64  # accumulated in float64
    torch.testing.assert_close(r["relu"], (h1a - h1).abs().mean(0).double())
    torch.testing.assert_close(r["relu#1"], (h2a - h2).abs().mean(0).double())


def test_top_k():
    sigma = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.9, 0.0, 0.2, 0.7, 0.4, 0.6, 0.8])
    assert top_k_sensitive(sigma, 0.1).tolist() == [1, 4]  # ceil(1.1) = 2; the tie goes to the lower index
    assert top_k_sensitive(sigma, 3).tolist() == [1, 4, 10]
    assert top_k_sensitive(sigma, 1.0).tolist() == sorted(range(11), key=lambda i: (-float(sigma[i]), i))
    assert top_k_sensitive(sigma, 0.01).tolist() == [1]  # at least one
    assert [top_k_count(c, 0.1) for c in (1, 9, 10, 11, 30, 64)] == [1, 1, 1, 2, 3, 7]
    assert top_k_count(5, 100) == 5
    per_layer = top_k_sensitive({"a": sigma, "b": sigma[:4]}, 0.5)
    assert per_layer["a"].tolist() == [1, 4, 10, 7, 9, 3] and per_layer["b"].tolist() == [1, 3]
    for bad, err in ((0.0, ValueError), (1.5, ValueError), (0, ValueError), (True, TypeError), ("x", TypeError)):
        with pytest.raises(err, match="k"):
            top_k_sensitive(sigma, bad)
    with pytest.raises(ValueError, match="sigma"):
        top_k_sensitive(sigma[None], 0.1)


def test_hooks_are_removed_after_success_and_after_an_exception():
    model = tiny_cnn()
    x, x_adv, y = batch()
    neuron_sensitivity(model, x, x_adv)
    assert no_hooks(model)

    class Boom(nn.Module):
        def forward(self, h):
            raise RuntimeError("boom")

    bad = nn.Sequential(model, Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        neuron_sensitivity(bad, x, x_adv)
    assert no_hooks(bad) and bad.training and all(p.requires_grad for p in bad.parameters())
    with pytest.raises(RuntimeError, match="boom"):
        SNSRegularizer(attack=lambda a, b: x_adv)(bad, x, y)
    assert no_hooks(bad)
    with pytest.raises(RuntimeError, match="boom"):
        neuron_sensitivity_metric(bad, (x, y), attack=lambda a, b: x_adv, quiet=True)
    assert no_hooks(bad)

    class Pair(nn.Module):  # a layer whose output is not a tensor cannot be watched
        def forward(self, h):
            return h, h

    odd = nn.Sequential(Pair(), nn.Sequential())
    with pytest.raises(TypeError, match="not a tensor"):
        neuron_sensitivity(odd, x, x_adv, layers=["0"])
    assert no_hooks(odd)
    with pytest.raises(ValueError, match="no module named"):
        neuron_sensitivity(model, x, x_adv, layers=["nope"])
    with pytest.raises(ValueError, match="not a submodule"):
        neuron_sensitivity(model, x, x_adv, layers=[nn.ReLU()])
    with pytest.raises(ValueError, match="x_adv must have the shape"):
        neuron_sensitivity(model, x, x_adv[:3])
    with pytest.raises(ValueError, match="layers="):
        neuron_sensitivity(nn.Sequential(nn.Flatten(), nn.Linear(72, 4)).double(), x, x_adv)


def test_metric_over_data_equals_the_pairwise_form():
    model = tiny_cnn()
    x, x_adv, y = batch(9)
    seen = []

    def attack(xb, yb):  # the batches come in order: hand out the matching rows of x_adv
        start = sum(seen)
        seen.append(len(xb))
        assert torch.equal(xb, x[start : start + len(xb)]) and torch.equal(yb, y[start : start + len(xb)])
        return x_adv[start : start + len(xb)]

    by_attack = neuron_sensitivity_metric(model, (x, y), attack=attack, batch_size=4, quiet=True)
    assert seen == [4, 4, 1]
    direct = neuron_sensitivity(model, x, x_adv)
    for name in direct:
        torch.testing.assert_close(by_attack[name], direct[name], rtol=1e-12, atol=1e-15)
    # the default adversary: PGD against the labels, seeded
    got = neuron_sensitivity_metric(model, (x, y), eps=0.1, steps=3, seed=5, quiet=True)
    x_pgd = pgd(model, x, y, eps=0.1, alpha=2.5 * 0.1 / 3, steps=3, generator=torch.Generator().manual_seed(5))
    expected = neuron_sensitivity(model, x, x_pgd)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-15)
    assert no_hooks(model) and got.n == 9 and neuron_sensitivity_metric(model, (x, y), n=4, quiet=True).n == 4


# ---- SNS ------------------------------------------------------------------------------------------


def brute_sns(model, x, x_adv, y, lam, k, names):
    """The SNS objective from the layer-by-layer features: per layer, sigma on the batch, the top
    ceil(k C) channels (k channels for an int k) by sorting the detached sigma, the mean of their
    sigma; then the adversarial CE."""
    clean = {n: f for n, f in brute_features(model, x).items() if n in names}
    adv = brute_features(model, x_adv)
    penalty = 0
    for name in names:
        d = (adv[name] - clean[name]).abs()
        sigma = torch.stack([d[:, c].reshape(len(d), -1).mean(1).mean() for c in range(d.shape[1])])
        count = k if isinstance(k, int) else max(1, math.ceil(k * len(sigma) - 1e-9))
        order = sorted(range(len(sigma)), key=lambda c: -float(sigma[c].detach()))[:count]
        penalty = penalty + sigma[order].mean()
    ce = F.cross_entropy(adv[list(adv)[-1]], y)
    return ce + lam * penalty, ce, penalty


@pytest.mark.parametrize("k", [0.1, 0.5, 2])
@pytest.mark.parametrize("bn_train", [False, True], ids=["nobn", "bn-train"])
def test_sns_objective_and_gradients_equal_brute_force(bn_train, k):
    model = tiny_cnn(bn=bn_train).train(bn_train)
    x, x_adv, y = batch()
    reference = copy.deepcopy(model)
    out = SNSRegularizer(attack=lambda a, b: x_adv, lam=0.7, k=k)(model, x, y)
    names = ["2", "4", "7"] if bn_train else ["1", "3", "6"]
    # brute force on a copy: its running statistics see the clean forward too, harmlessly (train
    # mode normalises with batch statistics)
    loss, ce, penalty = brute_sns(reference, x, x_adv, y, 0.7, k, names)
    torch.testing.assert_close(out.penalty, penalty, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out.ce, ce, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out.logits, reference(x_adv))
    assert_same_grads(param_grads(out.loss, model), param_grads(loss, reference))
    assert no_hooks(model)


def test_sns_moves_batchnorm_statistics_once_from_the_adversarial_batch():
    model = tiny_cnn(bn=True).train()
    reference = copy.deepcopy(model)
    x, x_adv, y = batch()
    SNSRegularizer(attack=lambda a, b: x_adv)(model, x, y)
    reference(x_adv)
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sns_default_adversary_is_seeded_pgd():
    model = tiny_cnn()
    x, _, y = batch()
    out = SNSRegularizer(eps=0.05, steps=2, lam=0.3, generator=torch.Generator().manual_seed(3))(model, x, y)
    x_pgd = pgd(model, x, y, eps=0.05, alpha=2.5 * 0.05 / 2, steps=2, generator=torch.Generator().manual_seed(3))
    loss, _, _ = brute_sns(model, x, x_pgd, y, 0.3, 0.1, ["1", "3", "6"])
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, err, name",
    [
        (dict(lam=-1.0), ValueError, "lam"),
        (dict(k=0.0), ValueError, "k"),
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(norm="l1"), ValueError, "norm"),
        (dict(attack=3), TypeError, "attack"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_sns_bad_arguments(kwargs, err, name):
    with pytest.raises(err, match=name):
        SNSRegularizer(**kwargs)


# ---- digits: plain > adversarially trained > SNS ------------------------------------------------


def train_digits(digits, kind, epochs, eps=0.1):
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=(64, 64))
    attack = PGD(model, eps=eps, alpha=2.5 * eps / 5, steps=5)
    sns = SNSRegularizer(eps=eps, steps=5, lam=1.0)
    objective = {
        "plain": None,
        "pgd": lambda m, x, y: adversarial_loss(m, x, y, attack).loss,
        "sns": lambda m, x, y: sns(m, x, y).loss,
    }[kind]
    fit(model, digits.x_train, digits.y_train, objective, epochs=epochs, check_finite=True)
    return model.eval()


def check_sensitivity_ordering(digits, epochs, n, steps):
    data = (digits.x_test[:n], digits.y_test[:n])
    results = {}
    for kind in ("plain", "pgd", "sns"):
        model = train_digits(digits, kind, epochs=epochs)
        with torch.no_grad():
            acc = (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
        assert acc > 0.8, (kind, acc)  # a working classifier: a dead network would have sigma 0
        results[kind] = neuron_sensitivity_metric(model, data, eps=0.1, steps=steps, quiet=True).mean
        assert no_hooks(model)
    # measured (3 epochs, 300 samples): plain 0.197, PGD-AT 0.111, SNS 0.070
    assert results["pgd"] < 0.8 * results["plain"] and results["sns"] < 0.8 * results["pgd"], results


def test_adversarial_training_lowers_neuron_sensitivity_and_sns_lowers_it_further(digits, one_thread):
    check_sensitivity_ordering(digits, epochs=3, n=300, steps=5)


@pytest.mark.slow
def test_adversarial_training_lowers_neuron_sensitivity_and_sns_lowers_it_further_full(digits, one_thread):
    check_sensitivity_ordering(digits, epochs=5, n=len(digits.y_test), steps=10)


@pytest.mark.cuda
def test_sns_and_sensitivity_cuda_match_cpu():
    model = tiny_cnn(bn=True).train()
    x, x_adv, y = batch()
    cpu = SNSRegularizer(attack=lambda a, b: x_adv)(copy.deepcopy(model), x, y)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = SNSRegularizer(attack=lambda a, b: x_adv.cuda())(gpu_model, x.cuda(), y.cuda())
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss)
    gpu.loss.backward()
    s_cpu = neuron_sensitivity(model, x, x_adv)
    s_gpu = neuron_sensitivity(copy.deepcopy(model).cuda(), x.cuda(), x_adv.cuda())
    for name in s_cpu:
        torch.testing.assert_close(s_gpu[name], s_cpu[name])
