"""Failures that must be reported, not suffered: a full disk, a mistyped or abbreviated option, an
interrupt, a model or setting an attack or metric cannot judge. Each test fails without its fix."""

import collections
import os
import stat

import pytest
import torch
from torch import nn

from fastrob import cli

TRAIN = ("train", "--epochs", "1", "--batch-size", "256", "--quiet")


def run(capsys, *args):
    """(exit status, stdout, stderr) of the fastrob command, in process."""
    try:
        code = cli.main(list(args))
    except SystemExit as exit:
        code = exit.code
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped"
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------------------
# writing outputs

# what torch.save's zip writer raises when the disk fills up under it
TORCH_FULL_DISK = RuntimeError(
    "[enforce fail at inline_container.cc:672] . unexpected pos 2048 vs 1984\n"
    "frame #0: c10::ThrowEnforceNotMet(char const*, int, char const*, std::string const&, void const*)"
)
Usage = collections.namedtuple("Usage", "total used free")


def failing_save(*args, **kwargs):
    raise TORCH_FULL_DISK


@pytest.mark.parametrize("free, words", [(0, "No space left on device"), (10 << 30, "Input/output error")])
def test_train_on_a_full_disk_is_one_line_and_leaves_no_file(capsys, monkeypatch, tmp_path, free, words):
    import fastrob._atomic

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(fastrob._atomic.shutil, "disk_usage", lambda path: Usage(1 << 30, (1 << 30) - free, free))
    code, _, err = run(capsys, *TRAIN, "--out", str(tmp_path / "run"))
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("fastrob: error: ") and words in err
    assert "checkpoint.pt" in err and "Traceback" not in err
    assert [n for n in os.listdir(tmp_path / "run") if n.startswith(".checkpoint") or n == "checkpoint.pt"] == []


def test_other_torch_save_errors_are_not_taken_for_a_full_disk(monkeypatch, tmp_path):
    from fastrob._atomic import torch_save

    def broken(*args, **kwargs):
        raise RuntimeError("cannot pickle this object")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        torch_save({}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    from fastrob._atomic import torch_save, write_json

    old = os.umask(umask)
    try:
        paths = [write_json({"a": 1}, str(tmp_path / "a.json")), torch_save({"a": 1}, str(tmp_path / "a.pt"))]
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert expected == 0o666 & ~umask
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in paths] == [expected, expected]


# ----------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize(
    "args, option",
    [
        (("--n", "5"), "--n"),  # was taken as --norm 5
        (("--epoch", "0"), "--epoch"),  # was taken as --epochs
        (("--batch", "0"), "--batch"),  # was taken as --batch-size
    ],
)
def test_abbreviated_options_are_refused(capsys, tmp_path, args, option):
    code, _, err = run(capsys, "train", *args, "--out", str(tmp_path / "r"))
    assert code == 2 and "unrecognized arguments" in err and option in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (("train", "--eps", "-1"), "argument --eps: expected a number >= 0"),
        (("frobnicate",), "invalid choice"),
        (("eval",), "--checkpoint"),
        (("train", "--bogus"), "unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors_are_one_line_without_the_usage_block(capsys, args, words):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fastrob: error: ") and words in err, err
    assert "usage:" not in err


def test_help_still_shows_the_usage(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "usage: fastrob train" in out and "--epochs" in out


def test_an_interrupt_while_starting_is_one_line(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, _, err = run(capsys, "info")
    assert code == 130 and err == "fastrob: interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # --debug keeps the traceback
        cli.main(["--debug", "info"])


def test_check_with_nothing_to_check_says_why_on_stderr(capsys, monkeypatch):
    from fastrob import verify

    monkeypatch.setattr(verify, "check_devices", lambda devices, ops=None, quiet=False: [])
    code, out, err = run(capsys, "check")
    assert code == 2 and "nothing to check" in err and "nothing to check" not in out


def test_check_record_path_in_a_missing_folder_fails_before_the_checks(capsys, monkeypatch, tmp_path):
    from fastrob import verify

    def no_checks(*args, **kwargs):
        raise AssertionError("the checks ran before the record path was checked")

    monkeypatch.setattr(verify, "check_devices", no_checks)
    target = tmp_path / "missing" / "record.json"
    code, _, err = run(capsys, "check", "--record", "--record-path", str(target))
    assert code == 2 and "--record-path" in err and "does not exist" in err and err.count("\n") == 1


def test_check_help_documents_the_exit_status(capsys):
    code, out, _ = run(capsys, "check", "--help")
    text = " ".join(out.split())
    assert code == 0 and "Exit status: 0 when every check passes" in text and "2 when there is nothing to check" in text


# ----------------------------------------------------------------------------------------------
# FAB


def linear_model(classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes))


class NaNAwayFromClean(nn.Module):
    """A model with finite logits and gradients at the clean points, NaN logits anywhere else."""

    def __init__(self, model, clean):
        super().__init__()
        self.model, self.clean = model, clean

    def forward(self, z):
        out = self.model(z)
        if z.shape == self.clean.shape:
            away = (z - self.clean).flatten(1).abs().amax(1) > 0
        else:
            away = torch.ones(z.shape[0], dtype=torch.bool)
        return out.masked_fill(away[:, None], float("nan"))


class SqrtInput(nn.Module):
    """sqrt of the input first: an infinite input gradient where a pixel is 0."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model(z.sqrt())


@pytest.mark.parametrize("multi_targeted", [False, True])
def test_fab_refuses_nan_logits_at_its_iterates(multi_targeted):
    from fastrob.attacks import FAB

    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    model = NaNAwayFromClean(linear_model(), x)
    y = model(x).argmax(1)
    with pytest.raises(ValueError, match=r"non-finite logits .*\(the attack's iterates\)"):
        FAB(model, eps=0.3, steps=10, n_classes=5, multi_targeted=multi_targeted)(x, y)


def test_fab_refuses_infinite_input_gradients():
    from fastrob.attacks import FAB

    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x[:, :, 0, 0] = 0  # sqrt's gradient is infinite there
    model = SqrtInput(linear_model())
    y = model(x).argmax(1)
    with pytest.raises(ValueError, match="FAB: the model's input gradient is not finite"):
        FAB(model, eps=0.3, steps=10, n_classes=5)(x, y)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(n_classes=1), ValueError, "n_classes must be >= 2, got 1"),
        (dict(n_classes="10"), TypeError, "n_classes must be an int, got str"),
        (dict(n_classes=10.0), TypeError, "n_classes must be an int"),
    ],
)
def test_fab_names_n_classes(kwargs, error, words):
    from fastrob.attacks import FAB

    with pytest.raises(error, match=words):
        FAB(linear_model(), **kwargs)


@pytest.mark.parametrize("multi_targeted", [False, True])
def test_fab_refuses_a_one_class_model(multi_targeted):
    from fastrob.attacks import FAB

    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(ValueError, match="model must return at least 2 logits per sample for FAB, got 1"):
        FAB(linear_model(classes=1), multi_targeted=multi_targeted)(x, torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# the masking report


def test_masking_report_refuses_a_one_class_model():
    from fastrob.metrics.masking import masking_report

    x = torch.rand(8, 1, 4, 4)
    with pytest.raises(ValueError, match="model must return at least 2 logits per sample"):
        masking_report(linear_model(classes=1), (x, torch.zeros(8, dtype=torch.long)), 0.1, n=8, quiet=True)


@pytest.mark.parametrize("large_eps", [0, 0.05, 0.1])
def test_masking_report_refuses_a_large_eps_not_above_eps(large_eps):
    from fastrob.metrics.masking import masking_report

    x = torch.rand(8, 1, 4, 4)
    model = linear_model()
    with pytest.raises(ValueError, match=r"large_eps must be larger than eps = 0\.1"):
        masking_report(model, (x, model(x).argmax(1)), 0.1, large_eps=large_eps, n=8, quiet=True)


# ----------------------------------------------------------------------------------------------
# set_device


def every_attack(model):
    from fastrob.attacks import APGD, APGDT, FAB, FGSM, PGD, PGDL2, AutoAttack, Square

    return [PGD(model), PGDL2(model), FGSM(model), APGD(model), APGDT(model), FAB(model), Square(model)] + [
        AutoAttack(model, n_classes=5)
    ]


def test_set_device_cuda_without_a_gpu_is_refused_in_fastrobs_words(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for attack in every_attack(linear_model()):
        with pytest.raises(ValueError, match="device: cuda was asked for but no GPU is visible"):
            attack.set_device("cuda")
        with pytest.raises(ValueError, match="device: meta holds no values"):
            attack.set_device("meta")
        with pytest.raises(ValueError, match="not a torch device: 'gpu0'"):
            attack.set_device("gpu0")


def test_set_device_cpu_and_none_still_work():
    x = torch.rand(4, 1, 4, 4)
    for attack in every_attack(linear_model()):
        attack.set_device("cpu")
        assert attack.device == torch.device("cpu")
        attack.set_device(None)
        assert attack.device is None
    from fastrob.attacks import PGD

    attack = PGD(linear_model(), eps=0.1, steps=2)
    attack.set_device(torch.device("cpu"))
    assert attack(x, torch.zeros(4, dtype=torch.long)).shape == x.shape


def test_the_command_line_keeps_its_device_errors(capsys):
    code, _, err = run(capsys, "demo", "--device", "meta")
    assert code == 2 and "argument --device: meta holds no values" in err
    code, _, err = run(capsys, "demo", "--device", "tpu9")
    assert code == 2 and "argument --device: not a torch device: 'tpu9'" in err


# ----------------------------------------------------------------------------------------------
# half precision: the output stays in the ball


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_attacks_stay_inside_eps(dtype):
    from fastrob.attacks import APGD, FAB, FGSM, PGD, PGDL2, Square

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).to(dtype)
    x = torch.rand(32, 1, 8, 8).to(dtype)
    y = model(x).argmax(1)
    attacks = [
        ("linf", 0.1, PGD(model, eps=0.1, alpha=0.03, steps=5)),
        ("linf", 0.1, FGSM(model, eps=0.1)),
        ("linf", 0.1, APGD(model, eps=0.1, steps=5)),
        ("linf", 0.1, Square(model, eps=0.1, n_queries=30)),
        ("linf", 0.1, FAB(model, eps=0.1, steps=5, n_classes=5)),
        ("l2", 1.0, PGDL2(model, eps=1.0, alpha=0.5, steps=5)),
        ("l2", 1.0, APGD(model, norm="L2", eps=1.0, steps=5)),
    ]
    for norm, eps, attack in attacks:
        out = attack(x, y)
        assert out.dtype == dtype
        delta = (out.float() - x.float()).flatten(1)  # exact: both are representable in float32
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= torch.tensor(eps, dtype=torch.float32).item(), (attack, float(size.max()))
        assert float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fit_into_ball_rounds_towards_the_clean_point(dtype, norm):
    from fastrob.ops.pgd_step import fit_into_ball

    g = torch.Generator().manual_seed(3)
    x = torch.rand(64, 3, 5, 5, generator=g).to(dtype)
    eps = 0.05 if norm == "linf" else 0.4
    delta = torch.randn(64, 3, 5, 5, generator=g)
    if norm == "linf":
        delta = delta.sign() * eps  # on the sphere: rounding to nearest overshoots half the time
    else:
        delta = delta * eps / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x_adv = (x.float() + delta).clamp(0, 1).to(dtype)

    def size(t):
        delta = (t.float() - x.float()).flatten(1)
        return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)

    assert bool((size(x_adv) > eps).any())  # the rounding does overshoot
    fitted = fit_into_ball(x_adv, x, eps, norm)
    assert bool((size(fitted) <= eps).all())
    assert bool((size(fit_into_ball(x_adv, x, torch.full((64,), eps), norm)) <= eps).all())  # eps per sample
    moved = fitted != x_adv
    assert ((fitted.float() - x_adv.float()).abs()[moved] > 0).all()  # one unit, towards x
    assert bool(((fitted.float() - x.float()).abs() <= (x_adv.float() - x.float()).abs()).all())
    # float32 and float64 are left as they are
    x32 = x.float()
    assert fit_into_ball(x32 + 1, x32, eps, norm).equal(x32 + 1)


# ----------------------------------------------------------------------------------------------
# a model that detaches its input


class DetachesInput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x.detach())


@pytest.mark.parametrize(
    "build",
    [
        lambda R: R.InputGradientRegularizer(),
        lambda R: R.InputGradientRegularizer(mode="fd"),
        lambda R: R.JacobianRegularizer(),
        lambda R: R.JSIGRRegularizer(),
        lambda R: R.LipschitzRegularizer(),
    ],
)
def test_regularizers_say_the_model_does_not_depend_on_x(build):
    from fastrob import regularizers

    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    with pytest.raises(ValueError, match="the model's output does not depend on x"):
        build(regularizers)(DetachesInput(), x, y)


def test_saliency_says_the_model_does_not_depend_on_x():
    from fastrob import interpret

    with pytest.raises(ValueError, match="the model's output does not depend on x"):
        interpret.saliency(DetachesInput(), torch.rand(4, 1, 8, 8), torch.arange(4))


# ----------------------------------------------------------------------------------------------
# pgd_step with a non-finite gradient


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_pgd_step_refuses_a_non_finite_gradient_in_both_norms(norm, bad):
    from fastrob.ops import pgd_step

    x = torch.rand(3, 8)
    grad = torch.randn(3, 8)
    grad[1, 2] = bad
    with pytest.raises(ValueError, match="grad must be finite, got NaN or inf entries in 1 of 3 samples"):
        pgd_step(x, grad, x, alpha=0.1, eps=0.1, norm=norm)
