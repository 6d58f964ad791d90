"""Bad input and faults: no number that looks valid when it is not, no model state
changed behind the user's back, no run lost, and from the CLI one line instead of a traceback."""

import os
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fastrob
from fastrob import regularizers
from fastrob._checks import check_logits
from fastrob.data import load_dataset, load_npz
from fastrob.metrics import accuracy_curve, ara, kl_robustness, robust_accuracy


class NaNModel(nn.Module):
    """A linear classifier whose logits are NaN: argmax would be class 0 for every sample."""

    def __init__(self, classes=4):
        super().__init__()
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


class BNNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, classes)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x.flatten(1)))))


def mlp(classes=4, dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Softplus(), nn.Dropout(dropout), nn.Linear(32, classes))


def toy_data(n=16, classes=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, classes, (n,), generator=g)


def identity_attack(x, y):
    return x.clone()


def always_right(classes=4):
    """A 'model' that returns the labels it was built for as one-hot logits (clean accuracy 1)."""
    x, y = toy_data(classes=classes)
    table = {tuple(xi.flatten().tolist()): yi for xi, yi in zip(x, y)}

    def model(inp):
        return (
            nn.functional.one_hot(
                torch.stack([table.get(tuple(r.flatten().tolist()), torch.tensor(0)) for r in inp]), classes
            ).float()
            * 5
        )

    return model, (x, y)


# ---- 1. non-finite logits and attack outputs --------------------------------------------------


def test_check_logits_rejects_non_finite_and_names_where():
    logits = torch.zeros(4, 3)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite logits .*2 of 4 samples \(adversarial inputs\)"):
        check_logits(logits, 4, where="adversarial inputs")
    check_logits(torch.zeros(4, 3), 4)  # finite: fine, and `where` stays optional


def test_nan_logits_give_an_error_not_robust_accuracy():
    x, y = toy_data()
    with pytest.raises(ValueError, match=r"non-finite logits.*clean inputs"):
        robust_accuracy(NaNModel(), (x, y), identity_attack, quiet=True)


def test_nan_logits_give_an_error_not_ara():
    x, y = toy_data()
    with pytest.raises(ValueError, match="non-finite logits"):
        ara(NaNModel(), (x, y), n=16, steps=2, search_steps=2, quiet=True)


def test_nan_logits_on_adversarial_inputs_only():
    x, y = toy_data()
    x = x * 0.5
    model = mlp()

    def nan_above_half(inp):  # finite on the clean inputs, NaN on what the attack returns
        out = model(inp)
        return torch.where(inp.flatten(1).amax(1, keepdim=True) > 0.6, out * float("nan"), out)

    y = nan_above_half(x).argmax(1)  # every sample clean-correct, so every one is attacked
    with pytest.raises(ValueError, match=r"non-finite logits.*adversarial inputs"):
        robust_accuracy(nan_above_half, (x, y), lambda a, b: (a + 0.3).clamp(0, 1), quiet=True)


@pytest.mark.parametrize(
    "attack, error, words",
    [
        (lambda x, y: None, TypeError, "must return a tensor"),
        (lambda x, y: x[:, :, :2], ValueError, "shape of x"),
        (lambda x, y: x.flatten(1), ValueError, "shape of x"),
        (lambda x, y: x * float("nan"), ValueError, "non-finite"),
        (lambda x, y: x + 2.0, ValueError, r"outside \[0, 1\]"),
    ],
)
def test_a_user_attack_must_return_valid_images(attack, error, words):
    model, data = always_right()
    with pytest.raises(error, match=words):
        robust_accuracy(model, data, attack, quiet=True)


def test_an_attack_that_leaves_its_ball_is_refused():
    model, data = always_right()

    class Cheat:
        eps, norm = 0.01, "linf"

        def __call__(self, x, y):
            return (x + 0.2).clamp(0, 1)

    with pytest.raises(ValueError, match="outside its linf ball of eps=0.01"):
        robust_accuracy(model, data, Cheat(), quiet=True)
    # fastrob's own attack class (eps, class name PGD) is inside its ball: accepted
    net = mlp()
    x, y = data
    y = net(x).argmax(1)
    result = robust_accuracy(net, (x, y), fastrob.attacks.PGD(net, eps=0.05, alpha=0.02, steps=2), quiet=True)
    assert 0 <= result.accuracy <= 1 and result.n == 16


# ---- 2. the metrics restore each module's mode ------------------------------------------------


@pytest.mark.parametrize("metric", ["robust_accuracy", "accuracy_curve", "kl_robustness", "ara"])
def test_metrics_restore_each_modules_mode(metric):
    torch.manual_seed(0)
    model = BNNet()
    model.train()
    model.bn.eval()
    data = toy_data()
    if metric == "robust_accuracy":
        robust_accuracy(model, data, identity_attack, quiet=True)
    elif metric == "accuracy_curve":
        accuracy_curve(model, data, [0.05], steps=2, quiet=True)
    elif metric == "kl_robustness":
        kl_robustness(model, data, eps=0.05, steps=2, restarts=1, quiet=True)
    else:
        ara(model, data, n=16, steps=2, search_steps=2, quiet=True)
    assert model.training and model.fc.training and model.out.training
    assert not model.bn.training  # the user's choice survives


# ---- 3. finite differences with Dropout --------------------------------------------------------


def test_fd_penalty_with_dropout_is_a_finite_difference_of_one_function():
    model = mlp(classes=10, dropout=0.5)
    model.train()
    x = torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    penalties = []
    for h in (0.1, 0.01, 0.001):
        torch.manual_seed(5)
        exact = float(regularizers.InputGradientRegularizer(mode="exact")(model, x, y).penalty.detach())
        torch.manual_seed(5)
        fd = float(regularizers.InputGradientRegularizer(mode="fd", h=h)(model, x, y).penalty.detach())
        penalties.append(fd)
        assert fd == pytest.approx(exact, rel=0.05), (h, fd, exact)  # same masks: the exact penalty's
    assert penalties[-1] < 2 * penalties[0]  # not growing as 1/h^2
    # and the replay leaves the global RNG where one forward leaves it
    torch.manual_seed(7)
    regularizers.InputGradientRegularizer(mode="fd")(model, x, y)
    after_fd = torch.rand(3)
    torch.manual_seed(7)
    regularizers.InputGradientRegularizer(mode="exact")(model, x, y)
    assert torch.equal(after_fd, torch.rand(3))


# ---- 4. NaN pixels, empty batches, dtype and meta in the regularizers --------------------------

REGULARIZERS = {
    "input_gradient": lambda: regularizers.InputGradientRegularizer(),
    "input_gradient_fd": lambda: regularizers.InputGradientRegularizer(mode="fd"),
    "jacobian": lambda: regularizers.JacobianRegularizer(),
    "lipschitz": lambda: regularizers.LipschitzRegularizer(),
}


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_regularizers_reject_a_non_finite_pixel(name, bad):
    x, y = toy_data()
    x[3, 0, 1, 2] = bad
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        REGULARIZERS[name]()(mlp(), x, y)


def test_jsigr_rejects_a_nan_pixel():
    x, y = toy_data()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        regularizers.JSIGRRegularizer(patch=2)(mlp(), x, y)


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_regularizers_refuse_an_empty_batch(name):
    with pytest.raises(ValueError, match="x holds no samples"):
        REGULARIZERS[name]()(mlp(), torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_regularizers_name_a_dtype_mismatch(name):
    x, y = toy_data()
    with pytest.raises(TypeError, match="x has dtype float64 but the model's parameters are float32"):
        REGULARIZERS[name]()(mlp(), x.double(), y)


def test_meta_device_is_refused_up_front():
    x, y = toy_data()
    with pytest.raises(ValueError, match="meta device"):
        regularizers.InputGradientRegularizer()(mlp(), x.to("meta"), y.to("meta"))
    with pytest.raises(ValueError, match="model's parameters are on the meta device"):
        regularizers.InputGradientRegularizer()(mlp().to("meta"), x, y)
    with pytest.raises(ValueError, match="meta device"):
        robust_accuracy(mlp().to("meta"), (x, y), identity_attack, quiet=True)


def test_metrics_name_a_dtype_mismatch():
    x, y = toy_data()
    with pytest.raises(TypeError, match="x has dtype float64"):
        robust_accuracy(mlp(), (x.double(), y), identity_attack, quiet=True)


def test_lipschitz_state_must_hold_a_number():
    reg = regularizers.LipschitzRegularizer()
    with pytest.raises(TypeError, match=r"state\['R'\] must be a real number, got str"):
        reg.load_state_dict({"R": "abc"})
    with pytest.raises(TypeError, match=r"state\['R'\]"):
        reg.load_state_dict({"R": None})
    reg.load_state_dict({"R": torch.tensor(0.5)})  # a 0-dim tensor is a number
    assert reg.R == 0.5


# ---- weak: the metrics' other inputs ------------------------------------------------------------

EMPTY = (torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize(
    "metric",
    [
        lambda m: robust_accuracy(m, EMPTY, identity_attack, quiet=True),
        lambda m: accuracy_curve(m, EMPTY, [0.1], quiet=True),
        lambda m: kl_robustness(m, EMPTY, eps=0.1, quiet=True),
    ],
)  # ara refused empty data already
def test_every_metric_refuses_empty_data(metric):
    with pytest.raises(ValueError, match="no samples"):
        metric(mlp())


def test_accuracy_curve_checks_eps_list_and_norm_up_front():
    with pytest.raises(TypeError, match="eps_list must be a sequence"):
        accuracy_curve(mlp(), toy_data(), 0.1, quiet=True)
    # no sample is clean-correct here, so PGD never runs: the norm must still be checked
    x, y = toy_data()
    wrong = (mlp()(x).argmax(1) + 1) % 4
    with pytest.raises(ValueError, match="norm must be one of"):
        accuracy_curve(mlp(), (x, wrong), [0.1], norm="l3", quiet=True)


def test_robust_accuracy_has_as_dict():
    model, data = always_right()
    result = robust_accuracy(model, data, identity_attack, quiet=True)
    assert result.as_dict() == {"accuracy": 1.0, "clean_accuracy": 1.0, "n": 16, "attack": "identity_attack"}


# ---- weak: data ----------------------------------------------------------------------------------


def test_digits_size_zero_is_refused():
    with pytest.raises(ValueError, match="size must be one of"):
        load_dataset("digits", 0)


def test_sparse_labels_are_refused(tmp_path):
    path = tmp_path / "sparse.npz"
    y = np.array([0, 1000, 2000, 3000] * 5)
    np.savez(path, x=np.random.default_rng(0).random((20, 1, 4, 4)).astype(np.float32), y=y)
    with pytest.raises(ValueError, match=r"4 distinct values up to 3000.*relabel"):
        load_dataset(str(path))
    # a class or two absent from the data is fine
    np.savez(
        path, x=np.random.default_rng(0).random((20, 1, 4, 4)).astype(np.float32), y=np.array([0, 1, 3] * 6 + [0, 1])
    )
    assert load_dataset(str(path)).num_classes == 4


def test_a_text_file_named_npz_is_not_a_valid_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("x,y\n0.1,2\n")
    with pytest.raises(ValueError, match=f"{path}: not a valid .npz file") as err:
        load_npz(str(path))
    assert "pickled" not in str(err.value)


def test_an_object_array_names_the_file(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([np.zeros((1, 4, 4)), "a"], dtype=object), y=np.array([0, 1]))
    with pytest.raises(ValueError, match=f"{path}: array 'x' holds Python objects"):
        load_npz(str(path))


# ---- weak: progress on a stderr that is not a terminal -------------------------------------------


def test_progress_writes_one_line_per_stage_into_a_log(capsys):
    x, y = toy_data(64)
    robust_accuracy(mlp(), (x, y), identity_attack, batch_size=4, quiet=False)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.count("\n") == 1 and err.startswith("robust accuracy: 64 img")
    robust_accuracy(mlp(), (x, y), identity_attack, batch_size=4, quiet=True)
    assert capsys.readouterr().err == ""


def test_training_progress_in_a_log(capsys, digits):
    from fastrob.data import Dataset, Split
    from fastrob.trainer import TrainConfig, train

    small = Split(digits.x_train[:64], digits.y_train[:64], digits.x_test[:32], digits.y_test[:32])
    train(TrainConfig(epochs=2, batch_size=16), dataset=Dataset("digits", small, 10, (1, 8, 8)))
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1 and "8 batch" in err


# ---- CLI ------------------------------------------------------------------------------------------


def cli(capsys, *args):
    from fastrob.cli import main

    try:
        code = main(list(args))
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, words, status=2):
    assert code == status, err
    assert err.count("\n") == 1 and err.startswith("fastrob: error:") and "Traceback" not in err, err
    assert words in err, err


TRAIN = ("train", "--epochs", "1", "--batch-size", "256", "--quiet")


def test_train_out_empty_fails_before_training(capsys, monkeypatch):
    import fastrob.trainer

    monkeypatch.setattr(fastrob.trainer, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    code, _, err = cli(capsys, *TRAIN, "--out", "")
    one_line_error(code, err, "--out must name an output directory")


@pytest.mark.parametrize(
    "command",
    [
        ("train", "--epochs", "1"),
        ("eval", "--checkpoint", "nowhere"),
        ("explain", "--checkpoint", "nowhere"),
        ("demo", "--epochs", "1"),
    ],
)
def test_every_subcommand_checks_its_out_first(capsys, tmp_path, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, _, err = cli(capsys, *command, "--out", str(a_file))
    one_line_error(code, err, "exists and is not a directory")
    code, _, err = cli(capsys, *command, "--out", str(a_file / "below"))
    one_line_error(code, err, "is not a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_out_not_writable(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = cli(capsys, *TRAIN, "--out", str(locked / "run"))
    finally:
        locked.chmod(0o700)
    one_line_error(code, err, "is not writable")


@pytest.mark.parametrize(
    "args, words",
    [
        (("--seed", "-1"), "seed in [0, 4294967295]"),
        (("--seed", str(2**40)), "seed in [0, 4294967295]"),
        (("--device", "meta"), "meta holds no values"),
    ],
)
def test_seed_and_device_are_one_line(capsys, tmp_path, args, words):
    code, _, err = cli(capsys, *TRAIN, "--out", str(tmp_path / "run"), *args)
    assert code == 2 and words in err and "Traceback" not in err


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path):
    code, _, err = cli(capsys, *TRAIN, "--out", str(tmp_path), "--resume", "--overwrite")
    one_line_error(code, err, "--resume and --overwrite contradict")


@pytest.mark.parametrize("content", ["garbage", "truncated", "foreign"])
def test_resume_from_a_bad_checkpoint_is_one_line(capsys, tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif content == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        torch.save({"config": {}, "model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    code, _, err = cli(capsys, *TRAIN, "--out", str(tmp_path), "--resume")
    one_line_error(code, err, "not a fastrob checkpoint")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One epoch of training on a small relative-path .npz, from a directory of its own."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    x = rng.random((48, 1, 4, 4)).astype(np.float32)
    np.savez(root / "small.npz", x=x, y=(x.mean((1, 2, 3)) > 0.5).astype(np.int64))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from fastrob.cli import main

        assert (
            main(["train", "--data", "small.npz", "--epochs", "1", "--batch-size", "16", "--quiet", "--out", "run"])
            == 0
        )
    finally:
        os.chdir(cwd)
    return root


def test_eval_from_another_directory_finds_the_data(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(
        capsys,
        "eval",
        "--checkpoint",
        str(run_dir / "run"),
        "--eps",
        "0.1",
        "--steps",
        "1",
        "--ara-n",
        "0",
        "--kl-eps",
        "0",
        "--interp-eps",
        "0",
        "--sens-eps",
        "0",
        "--quiet",
        "--out",
        str(tmp_path / "ev"),
    )
    assert code == 0, err
    assert (tmp_path / "ev" / "eval.json").is_file()


def test_resume_says_which_arguments_it_ignored(capsys, run_dir, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(run_dir / "run", out)
    code, _, err = cli(
        capsys,
        "train",
        "--data",
        str(run_dir / "small.npz"),
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--quiet",
        "--resume",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert err.startswith("fastrob: warning:") and "ignored: lr=0.01 (the checkpoint's 0.002)" in err
    assert "batch_size" not in err  # a default left alone is not reported


def test_a_second_run_into_the_same_out_is_refused(capsys, tmp_path):
    (tmp_path / ".fastrob.lock").write_text(str(os.getpid()))  # a live process holds it
    code, _, err = cli(capsys, *TRAIN, "--out", str(tmp_path))
    one_line_error(code, err, "in use by another fastrob run")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_stale_lock_is_taken_over(capsys, tmp_path, one_thread):
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".fastrob.lock").write_text(str(dead.pid))
    code, _, err = cli(capsys, *TRAIN, "--out", str(tmp_path))
    assert code == 0, err
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / ".fastrob.lock").exists()


def test_an_empty_lock_is_refused_while_fresh_and_taken_over_when_old(tmp_path):
    """A run creates its lock and then writes its pid: an empty lock is a run taking it now,
    unless it is older than that takes (then its run died in between)."""
    from fastrob._rundir import FRESH_EMPTY_LOCK_S, LOCK, run_lock

    lock = tmp_path / LOCK
    lock.write_text("")
    with pytest.raises(ValueError, match="being taken by another fastrob run"):
        with run_lock(str(tmp_path)):
            pass
    assert lock.exists() and lock.read_text() == ""  # not removed: it belongs to the other run
    old = lock.stat().st_mtime - 2 * FRESH_EMPTY_LOCK_S
    os.utime(lock, (old, old))
    with run_lock(str(tmp_path)):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_a_full_disk_leaves_no_partial_checkpoint_and_one_line(capsys, tmp_path, monkeypatch, one_thread):
    import errno

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as h:
            h.write(b"half a checkp")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = cli(capsys, *TRAIN, "--out", str(tmp_path / "run"))
    one_line_error(code, err, "No space left on device", status=1)
    assert [p for p in os.listdir(tmp_path / "run") if not p.startswith(".fastrob.lock")] == []


def test_a_full_disk_while_writing_json_or_png(tmp_path, monkeypatch):
    import json

    from fastrob import _atomic, plots

    target = tmp_path / "metrics.json"
    target.write_text('{"old": 1}')

    def broken_dump(obj, f, **k):
        f.write('{"new": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        _atomic.write_json({"new": 2}, str(target))
    assert json.loads(target.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["metrics.json"]
    monkeypatch.undo()

    import matplotlib.figure

    def broken_savefig(self, fname, **k):
        open(fname, "wb").write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError):
        plots.training_curves(
            [
                {
                    "epoch": 1,
                    "loss": 1.0,
                    "ce": 1.0,
                    "penalty": 0.0,
                    "train_accuracy": 0.5,
                    "test_accuracy": 0.5,
                    "seconds": 1.0,
                }
            ],
            str(tmp_path / "training.png"),
        )
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    from fastrob.cli import main

    code, _, err = cli(capsys, *TRAIN, "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r"))
    one_line_error(code, err, "missing.npz")
    with pytest.raises(ValueError, match="missing.npz"):
        main(["--debug", *TRAIN, "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r")])
    monkeypatch.setenv("FASTROB_DEBUG", "1")
    with pytest.raises(ValueError, match="missing.npz"):
        main([*TRAIN, "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r")])


def test_a_nan_training_loss_stops_the_run(monkeypatch, digits, tmp_path):
    """With a clear error and no other warning (such as backward's requires_grad warning), and
    no checkpoint or lock left behind."""
    import fastrob.trainer
    from fastrob.data import Dataset, Split
    from fastrob.objective import Objective

    def nan_objective(config, model, steps_per_epoch=1):
        def objective(model, x, y):
            logits = model(x)
            loss = logits.sum() * float("nan")
            return Objective(loss, loss, loss.new_zeros(()), logits)

        return objective

    monkeypatch.setattr(fastrob.trainer, "build_objective", nan_objective)
    small = Split(digits.x_train[:32], digits.y_train[:32], digits.x_test[:16], digits.y_test[:16])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*requires_grad.*")  # backward's warning on a NaN loss
        with pytest.raises(ValueError, match="training loss is nan at epoch 1: training diverged"):
            fastrob.trainer.train(
                fastrob.trainer.TrainConfig(epochs=1, batch_size=16),
                str(tmp_path),
                quiet=True,
                dataset=Dataset("digits", small, 10, (1, 8, 8)),
            )
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / ".fastrob.lock").exists()
