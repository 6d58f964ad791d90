"""Failures that must be reported, not suffered: a full disk, a mistyped or abbreviated option, an
interrupt, a model or setting an attack or metric cannot judge. Each test fails without its fix."""

import collections
import os
import stat
import warnings

import pytest
import torch

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


def test_a_diverged_loss_raises_without_a_requires_grad_warning(monkeypatch, tmp_path):
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
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8, generator=g), torch.arange(32) % 10
    data = Dataset("digits", Split(x[:16], y[:16], x[16:], y[16:]), 10, (1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="training loss is nan"):
            fastrob.trainer.train(fastrob.trainer.TrainConfig(epochs=1, batch_size=16), quiet=True, dataset=data)
