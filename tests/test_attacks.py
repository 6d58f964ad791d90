"""fastrob.attacks: parity with torchattacks, constraints, restarts, compaction, model state, errors."""

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

torchattacks = pytest.importorskip("torchattacks")

from train_loop import fit  # noqa: E402

import fastrob.attacks as fa  # noqa: E402

# the module that warns once per process when a CUDA graph cannot be captured
pgd_module = importlib.import_module("fastrob.attacks.graph")


def make_cnn(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    ).to(dtype)


@pytest.fixture(scope="module")
def net(digits):
    """A small CNN trained on the digits (about 97% test accuracy), in eval mode."""
    torch.manual_seed(0)
    model = make_cnn()
    fit(model, digits.x_train, digits.y_train, epochs=12, batch=128)
    model.eval()
    for p in model.parameters():
        p.grad = None
    acc = (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    assert acc > 0.9, acc
    return model


@pytest.fixture(scope="module")
def net64(net):
    return copy.deepcopy(net).double()


@pytest.fixture
def batch(digits):
    return digits.x_test[:96], digits.y_test[:96]


def robust(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


# --- parity with torchattacks -------------------------------------------------------------------

# torchattacks' PGDL2 divides the gradient of the *mean* loss by its norm + 1e-10, which shortens
# the step of confidently classified samples (their gradient norm / B is near 1e-10); fastrob
# divides by the exact norm. With eps_for_division=0 in float64 both compute the same step.
PARITY = [
    ("PGD", dict(eps=0.1, alpha=0.02, steps=7)),
    ("PGDL2", dict(eps=0.8, alpha=0.2, steps=7, eps_for_division=0.0)),
    ("FGSM", dict(eps=0.1)),
]


@pytest.mark.parametrize("name,kwargs", PARITY, ids=[p[0] for p in PARITY])
@pytest.mark.parametrize("random_start", [False, True])
def test_same_images_as_torchattacks(net, net64, batch, name, kwargs, random_start):
    if name == "FGSM" and random_start:
        pytest.skip("FGSM has no random start")
    x, y = batch
    model = net
    if name == "PGDL2":
        model, x = net64, x.double()
    extra = {} if name == "FGSM" else {"random_start": random_start}
    torch.manual_seed(3)
    expected = getattr(torchattacks, name)(model, **kwargs, **extra)(x, y)
    torch.manual_seed(3)
    got = getattr(fa, name)(model, **kwargs, **extra)(x, y)
    assert not torch.equal(expected, x)  # the attack moved something
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_targeted_by_label_same_as_torchattacks(net, batch):
    x, y = batch
    target = (y + 3) % 10
    ref = torchattacks.PGD(net, eps=0.15, alpha=0.03, steps=8, random_start=False)
    ref.set_mode_targeted_by_label(quiet=True)
    ours = fa.PGD(net, eps=0.15, alpha=0.03, steps=8, random_start=False)
    ours.set_mode_targeted_by_label(quiet=True)
    expected, got = ref(x, target), ours(x, target)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    hit = ~robust(net, got, target)  # "robust" w.r.t. the target = not reaching it
    assert (~hit).float().mean() > (net(x).argmax(1) == target).float().mean()


@pytest.mark.parametrize("restarts", [1, 3])
def test_robust_accuracy_not_above_torchattacks(net, digits, restarts):
    x, y = digits.x_test, digits.y_test
    eps = 0.1
    gaps = []
    for seed in range(2):
        torch.manual_seed(100 + seed)
        ref = robust(net, torchattacks.PGD(net, eps=eps, alpha=eps / 4, steps=10)(x, y), y).float().mean()
        torch.manual_seed(200 + seed)
        ours = robust(net, fa.PGD(net, eps=eps, alpha=eps / 4, steps=10, restarts=restarts)(x, y), y).float().mean()
        gaps.append((ours - ref).item())
    assert 0.2 < ref < 0.8  # eps chosen so the comparison means something
    assert max(gaps) <= 0.015, gaps  # about 3 images of 450: noise between random starts


# --- constraints --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "margin", "kl", "dlr"])
def test_inside_ball_and_box(net64, digits, norm, loss):
    x, y = digits.x_test[:40].double(), digits.y_test[:40]
    gen = torch.Generator().manual_seed(0)
    eps = torch.rand(40, generator=gen, dtype=torch.float64) * (0.3 if norm == "linf" else 2.0)
    eps[:5] = 0.0
    x_adv = fa.pgd(net64, x, y, eps=eps, alpha=eps / 3, steps=6, norm=norm, loss=loss, restarts=2, generator=gen)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps + 1e-12).all())
    assert bool((x_adv >= 0).all()) and bool((x_adv <= 1).all())
    assert torch.equal(x_adv[:5], x[:5])
    assert bool((size[5:] > 0).any())


def test_steps_zero_returns_the_start(net, batch):
    x, y = batch
    assert torch.equal(fa.pgd(net, x, y, steps=0, random_start=False), x)
    torch.manual_seed(0)
    start = fa.pgd(net, x, y, eps=0.05, steps=0)
    assert 0 < (start - x).abs().max() <= 0.05 + 1e-7


# --- restarts -----------------------------------------------------------------------------------


def test_restarts_never_weaker_than_one_run(net64, digits):
    x, y = digits.x_test[:200].double(), digits.y_test[:200]
    for norm, eps in (("linf", 0.1), ("l2", 0.9)):
        one = fa.pgd(
            net64, x, y, eps=eps, alpha=eps / 4, steps=5, norm=norm, generator=torch.Generator().manual_seed(1)
        )
        many = fa.pgd(
            net64,
            x,
            y,
            eps=eps,
            alpha=eps / 4,
            steps=5,
            norm=norm,
            restarts=4,
            generator=torch.Generator().manual_seed(1),
        )
        r_one, r_many = robust(net64, one, y), robust(net64, many, y)
        assert bool((r_many <= r_one).all())  # every sample one run breaks, restarts break too


def test_restarts_keep_the_highest_loss(net64, digits):
    x, y = digits.x_test[:30].double(), digits.y_test[:30]
    kw = dict(eps=0.02, alpha=0.01, steps=3)
    x_best = fa.pgd(net64, x, y, restarts=4, generator=torch.Generator().manual_seed(2), **kw)
    # Restart r uses the r-th start drawn from the generator, so four single runs sharing one
    # generator run the same four restarts one at a time.
    gen = torch.Generator().manual_seed(2)
    singles = torch.stack([fa.pgd(net64, x, y, generator=gen, **kw) for _ in range(4)])
    with torch.no_grad():
        ce = torch.stack([F.cross_entropy(net64(s), y, reduction="none") for s in singles])
        assert not bool(torch.stack([~robust(net64, s, y) for s in singles]).any())  # eps too small to fool
    best = ce.argmax(0)
    assert len(set(best.tolist())) > 1  # the pick really varies between samples
    torch.testing.assert_close(x_best, singles[best, torch.arange(30)], atol=1e-12, rtol=0)


# --- early stop and compaction ------------------------------------------------------------------


class CountingModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


@pytest.mark.parametrize("norm,eps", [("linf", 0.12), ("l2", 0.6)])
def test_compaction_equals_no_compaction(net64, digits, norm, eps):
    x, y = digits.x_test[:150].double(), digits.y_test[:150]
    runs = {}
    for mode in ("robust_only", "early_stop"):
        counter = CountingModel(net64)
        x_adv, fooled = fa.pgd(
            counter,
            x,
            y,
            eps=eps,
            alpha=eps / 4,
            steps=8,
            norm=norm,
            restarts=3,
            generator=torch.Generator().manual_seed(7),
            return_fooled=True,
            **{mode: True},
        )
        runs[mode] = (x_adv, fooled, counter.rows)
    (a, fa_, rows_a), (b, fb, rows_b) = runs["robust_only"], runs["early_stop"]
    assert torch.equal(fa_, fb)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert torch.equal(robust(net64, a, y), ~fa_)  # the flag says what the model does on x_adv
    assert 0.2 < fa_.float().mean() < 0.95
    assert rows_a < 0.8 * rows_b  # dropping fooled samples saved forward passes


def test_early_stop_is_never_weaker_than_last_iterate(net64, digits):
    x, y = digits.x_test[:150].double(), digits.y_test[:150]
    kw = dict(eps=0.12, alpha=0.05, steps=8, generator=None)
    torch.manual_seed(4)
    last = robust(net64, fa.pgd(net64, x, y, **kw), y)
    torch.manual_seed(4)
    early = robust(net64, fa.pgd(net64, x, y, robust_only=True, **kw), y)
    assert bool((early <= last).all())


# --- model state --------------------------------------------------------------------------------


def test_model_state_restored_and_no_parameter_grads(digits):
    torch.manual_seed(0)
    model = make_cnn().train()
    model[0].weight.requires_grad_(False)
    model[3].bias.grad = torch.ones_like(model[3].bias)
    stats = model[1].running_mean.clone()
    flags = [p.requires_grad for p in model.parameters()]
    seen = []
    original_forward = model.forward

    def spy(x):
        seen.append((model.training, model[1].training))
        return original_forward(x)

    model.forward = spy
    fa.PGD(model, eps=0.1, alpha=0.05, steps=3)(digits.x_test[:16], digits.y_test[:16])
    assert seen and all(mode == (False, False) for mode in seen)  # attacked in eval mode
    assert model.training and model[1].training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model[1].running_mean, stats)  # BN statistics untouched
    assert torch.equal(model[3].bias.grad, torch.ones_like(model[3].bias))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "3.bias")


def test_model_state_restored_after_exception(digits):
    model = make_cnn().train()
    model[2].train(False)  # a submodule in a mode different from its parent
    calls = []
    original_forward = model.forward

    def failing(x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original_forward(x)

    model.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        fa.pgd(model, digits.x_test[:8], digits.y_test[:8], steps=5)
    assert model.training and model[1].training and not model[2].training
    assert all(p.requires_grad for p in model.parameters())


def test_training_mode_on_request(digits):
    model = make_cnn().eval()
    seen = []
    model[1].register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    attack = fa.PGD(model, eps=0.1, alpha=0.05, steps=2)
    attack.set_model_training_mode(model_training=True, batchnorm_training=True)
    attack(digits.x_test[:8], digits.y_test[:8])
    assert seen and all(seen)
    assert not model.training and not model[1].training


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(restarts=0), ValueError, "restarts"),
        (dict(eps=torch.ones(3)), ValueError, "eps"),
        (dict(norm="l1"), ValueError, "norm"),
        (dict(loss="hinge"), ValueError, "loss"),
        (dict(amp="fp8"), ValueError, "amp"),
        (dict(backend="tpu"), ValueError, "backend"),
        (dict(random_start="sphere"), ValueError, "random_start"),
        (dict(robust_only=True, early_stop=False), ValueError, "early_stop"),
        (dict(loss="kl", targeted=True), ValueError, "kl"),
    ],
)
def test_bad_arguments(net, batch, kwargs, error, match):
    x, y = batch
    with pytest.raises(error, match=match):
        fa.pgd(net, x, y, **kwargs)


def test_bad_inputs(net, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        fa.pgd(net, x * 2, y, steps=1)
    clamped = fa.pgd(net, x * 2, y, steps=1, clamp_input=True, random_start=False, eps=0.0)
    assert torch.equal(clamped, torch.clamp(x * 2, 0, 1))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        fa.pgd(net, bad, y)
    with pytest.raises(ValueError, match="y must hold labels in"):
        fa.pgd(net, x, y + 10)
    with pytest.raises(ValueError, match="y must hold labels in"):
        fa.pgd(net, x, y - 1)
    with pytest.raises(TypeError, match="y must hold integer"):
        fa.pgd(net, x, y.float())
    with pytest.raises(ValueError, match="y must have shape"):
        fa.pgd(net, x, y[:3])
    with pytest.raises(TypeError, match="x must be"):
        fa.pgd(net, x.numpy(), y)
    with pytest.raises(TypeError, match="model must be callable"):
        fa.pgd("net", x, y)
    with pytest.raises(ValueError, match="model must return logits"):
        fa.pgd(lambda inp: net(inp)[:, :, None], x, y)
    with pytest.raises(ValueError, match="model must return logits"):
        fa.pgd(lambda inp: net(inp)[:2], x, y)
    with pytest.raises(ValueError, match="loss must return one value per sample"):
        fa.pgd(net, x, y, loss=lambda z, t: F.cross_entropy(z, t))


# --- extras -------------------------------------------------------------------------------------


def test_callable_loss_and_margin(net64, digits):
    x, y = digits.x_test[:50].double(), digits.y_test[:50]
    kw = dict(eps=0.1, alpha=0.03, steps=4, random_start=False)
    ce = fa.pgd(net64, x, y, loss="ce", **kw)
    custom = fa.pgd(net64, x, y, loss=lambda z, t: F.nll_loss(F.log_softmax(z, 1), t, reduction="none"), **kw)
    torch.testing.assert_close(custom, ce)
    z = net64(x)
    other = z.clone()
    other[torch.arange(50), y] = -1e9
    torch.testing.assert_close(fa.margin_loss(z, y), other.amax(1) - z[torch.arange(50), y])
    margin = fa.pgd(net64, x, y, loss="margin", **kw)
    assert robust(net64, margin, y).float().mean() < robust(net64, x, y).float().mean()


def test_dlr_loss_by_name_is_croce_and_heins(net64, digits):
    x, y = digits.x_test[:50].double(), digits.y_test[:50]
    kw = dict(eps=0.1, alpha=0.03, steps=4, random_start=False)

    def written_out(z, t):  # -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), from the sorted logits
        ranked = z.sort(1, descending=True).values
        true = z[torch.arange(len(t)), t]
        best_other = torch.where(ranked[:, 0] == true, ranked[:, 1], ranked[:, 0])
        return -(true - best_other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)

    torch.testing.assert_close(fa.dlr_loss(net64(x), y), written_out(net64(x), y))
    torch.testing.assert_close(fa.pgd(net64, x, y, loss="dlr", **kw), fa.pgd(net64, x, y, loss=written_out, **kw))


def test_targeted_modes(net, batch):
    x, y = batch
    attack = fa.PGD(net, eps=0.2, alpha=0.05, steps=5)
    attack.set_mode_targeted_random(quiet=True)
    targets = attack.get_target_label(x, y)
    assert bool((targets != y).all()) and int(targets.max()) < 10
    attack.set_mode_targeted_least_likely(kth_min=1)
    with torch.no_grad():
        assert torch.equal(attack.get_target_label(x, y), net(x).argmin(1))
    attack.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 10)
    x_adv = attack(x, y)
    reached = ~robust(net, x_adv, (y + 1) % 10)
    assert reached.float().mean() > 0.3
    attack.set_mode_default()
    assert attack.get_mode() == "default" and not attack.targeted


def test_normalization_matches_a_wrapped_model(net, batch):
    x, y = batch
    plain = fa.PGD(_Affine(net, 0.3, 0.5), eps=0.1, alpha=0.03, steps=3, random_start=False)
    attack = fa.PGD(net, eps=0.1, alpha=0.03, steps=3, random_start=False)
    attack.set_normalization_used([0.3], [0.5])
    torch.testing.assert_close(attack(x, y), plain(x, y))


class _Affine(nn.Module):
    def __init__(self, model, mean, std):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def test_trades_start_and_ascent(net, batch):
    x, _ = batch
    torch.manual_seed(0)
    start = fa.trades_perturb(net, x, eps=0.1, alpha=0.02, steps=0)
    kick = start - x
    assert 0.0005 < kick[(x > 0.01) & (x < 0.99)].std() < 0.002  # x + 0.001·N(0, 1)
    torch.manual_seed(0)
    x_adv = fa.trades_perturb(net, x, eps=0.1, alpha=0.02, steps=5)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        p = F.softmax(net(x), 1)
        kl = lambda inp: (p * (p.log() - F.log_softmax(net(inp), 1))).sum(1).mean()  # noqa: E731
        assert kl(x_adv) > 10 * kl(start)


def test_amp_bf16_runs_and_stays_in_ball(net, batch):
    x, y = batch
    x_adv = fa.PGD(net, eps=0.1, alpha=0.03, steps=3, amp="bf16")(x, y)
    assert x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert robust(net, x_adv, y).float().mean() < robust(net, x, y).float().mean()


def test_cuda_graph_falls_back_on_cpu(net, batch):
    x, y = batch
    torch.manual_seed(0)
    eager = fa.PGD(net, eps=0.1, alpha=0.03, steps=3)(x, y)
    pgd_module._warned_graph = False  # the warning is once per process
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="cuda_graph"):
        graphed = fa.PGD(net, eps=0.1, alpha=0.03, steps=3, cuda_graph=True)(x, y)
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_triton_backend_matches_torch(net, batch, norm):
    x, y = batch[0][:4], batch[1][:4]
    kw = dict(eps=0.1 if norm == "linf" else 0.8, alpha=0.03, steps=2, norm=norm, random_start=False)
    torch.testing.assert_close(
        fa.pgd(net, x, y, backend="triton", **kw), fa.pgd(net, x, y, backend="torch", **kw), atol=1e-6, rtol=0
    )
    # per-sample eps, batched restarts and compaction go through the kernel's per-sample path
    eps = torch.tensor([0.0, 0.05, 0.1, 0.3]) * (1 if norm == "linf" else 8)
    kw = dict(eps=eps, alpha=eps / 2, steps=2, norm=norm, restarts=2, robust_only=True)
    got = fa.pgd(net, x, y, backend="triton", generator=torch.Generator().manual_seed(0), **kw)
    expected = fa.pgd(net, x, y, backend="torch", generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_same_as_torchattacks(net, batch, cuda_graph):
    x, y = batch[0].cuda(), batch[1].cuda()
    model = copy.deepcopy(net).cuda()
    expected = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=7, random_start=False)(x, y)
    attack = fa.PGD(model, eps=0.1, alpha=0.02, steps=7, random_start=False, cuda_graph=cuda_graph)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # the second call replays the captured graph
            torch.testing.assert_close(attack(x, y), expected, atol=1e-5, rtol=0)
