"""The fastrob command, run as a user runs it (a subprocess)."""

import json
import subprocess
import sys

import numpy as np
import pytest


def fastrob(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastrob", *args], capture_output=True, text=True, timeout=timeout)


def test_info_lists_every_backend_with_availability():
    result = fastrob("info")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("torch", "triton", "cuda"):
        row = [line for line in lines if line.strip().startswith(name + " ")]
        assert row, f"no line for backend {name}:\n{result.stdout}"
        assert " available " in row[0] or " unavailable " in row[0]
    assert "extension fastrob._C:" in result.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["demo", "--epochs", "0"], "expected a positive integer"),
        (["demo", "--device", "tpu9"], "--device"),
        (["frobnicate"], "invalid choice"),
        (["train", "--method", "dropout"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_clear_error(args, words):
    result = fastrob(*args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def parse_table(stdout):
    """{model name: [cells]} from the comparison table (the rows after the 'model' header)."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model"))
    rows = {}
    for line in lines[head + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        is_number = [c.rstrip("%").replace(".", "", 1).isdigit() for c in cells]
        numbers = [c for c, number in zip(cells, is_number) if number]
        rows[" ".join(cells[: is_number.index(True)])] = numbers  # the name: the words before the first number
    return lines[head].split(), rows


def in_process(capsys, *args):
    """(exit code, stdout, stderr) of fastrob.cli.main(args), for the error paths: the same code as
    the command without a new interpreter per case."""
    from fastrob.cli import main

    try:
        code = main(list(args))
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "--eps", "-0.1"], "expected a number >= 0"),
        (["train", "--lr", "0"], "expected a number > 0"),
        (["train", "--size", "2"], "image size >= 4"),
        (["eval"], "--checkpoint"),
        (["eval", "--checkpoint", "x", "--eps", "0.1,abc"], "comma-separated radii"),
        (["eval", "--checkpoint", "x", "--attack", "cw"], "invalid choice"),
        (["eval", "--checkpoint", "x", "--curve-attack", "fgsm"], "invalid choice"),
        (["explain", "--checkpoint", "x", "--samples", "-1"], "indices >= 0"),
    ],
)
def test_more_bad_arguments(capsys, args, words):
    code, _, err = in_process(capsys, *args)
    assert code == 2 and words in err and "Traceback" not in err


def test_demo_trains_four_models_and_compares_them(tmp_path):
    out = tmp_path / "demo"
    result = fastrob("demo", "--epochs", "2", "--n", "60", "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    header, rows = parse_table(result.stdout)
    assert header[:3] == ["model", "clean", "linf"] and "ARA" in header and "KL@0.1" in header
    assert "AA@0.1" in header and "masking" in header
    assert len(rows) == 4 and list(rows)[0] == "plain"
    for name, cells in rows.items():
        acc = [float(c.rstrip("%")) for c in cells[:5]]
        assert acc[0] > 40, (name, cells)  # trained, even in 2 epochs (chance is 10%)
        assert acc == sorted(acc, reverse=True)  # clean, then eps ascending: non-increasing
        assert float(cells[5].rstrip("%")) <= acc[2] + 1e-9  # AutoAttack at 0.1 is not weaker than PGD-20 there
    summary = json.loads((out / "demo.json").read_text())
    assert len(summary["models"]) == 4 and set(summary["results"]) == set(rows)
    for res in summary["results"].values():
        assert res["robust"]["attack"].startswith("AutoAttack") and res["masking"]["verdict"] in ("ok", "suspicious")
    for name in (
        "accuracy.png",
        "ara.png",
        "surfaces.png",
        "saliency.png",
        "models/trades/checkpoint.pt",
        "models/plain/metrics.json",
        "models/plain/training.png",
    ):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_full_demo_shows_what_the_docs_say(tmp_path):
    """The real demo (docs/cli.md, `fastrob demo`): every robust method beats the plain
    model at eps 0.1 and in ARA, and TRADES is the most robust at the largest eps."""
    result = fastrob("demo", "--quiet", "--out", str(tmp_path / "demo"), timeout=600)
    assert result.returncode == 0, result.stderr
    _, rows = parse_table(result.stdout)
    cell = {name: [float(c.rstrip("%")) for c in cells] for name, cells in rows.items()}
    plain = cell.pop("plain")
    assert plain[0] > 95
    for name, c in cell.items():
        assert c[0] > 95 and c[2] > plain[2] + 20 and c[5] > plain[5], name
    assert max(cell, key=lambda n: cell[n][4]).startswith("TRADES")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny runs: plain 3 epochs straight, and PGD-AT 2 epochs."""
    root = tmp_path_factory.mktemp("runs")
    plain = fastrob("train", "--epochs", "3", "--quiet", "--out", str(root / "plain"))
    assert plain.returncode == 0, plain.stderr
    pgd = fastrob(
        "train",
        "--method",
        "pgd",
        "--eps",
        "0.1",
        "--attack-steps",
        "2",
        "--epochs",
        "2",
        "--activation",
        "half_huber",
        "--quiet",
        "--out",
        str(root / "pgd"),
    )
    assert pgd.returncode == 0, pgd.stderr
    return root, plain, pgd


def test_train_writes_checkpoint_metrics_and_curve(trained):
    root, plain, pgd = trained
    for name, epochs in (("plain", 3), ("pgd", 2)):
        metrics = json.loads((root / name / "metrics.json").read_text())
        assert metrics["epochs"] == epochs and len(metrics["history"]) == epochs
        assert 0.5 < metrics["test_accuracy"] <= 1
        assert (root / name / "checkpoint.pt").is_file() and (root / name / "training.png").is_file()
    assert json.loads((root / "pgd" / "metrics.json").read_text())["method"] == "PGD-AT linf eps=0.1"
    assert "epoch" in plain.stdout and "wrote" in plain.stdout
    assert len([line for line in plain.stdout.splitlines() if line.split() and line.split()[0].isdigit()]) == 3


def test_resumed_training_equals_the_uninterrupted_run(trained, tmp_path):
    root, _, _ = trained
    out = tmp_path / "resumed"
    assert fastrob("train", "--epochs", "2", "--quiet", "--out", str(out)).returncode == 0
    again = fastrob("train", "--epochs", "3", "--quiet", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr  # never overwrites silently
    resumed = fastrob("train", "--epochs", "3", "--resume", "--quiet", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((out / "metrics.json").read_text())["history"]
    b = json.loads((root / "plain" / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], rel=1e-6)
    assert a[-1]["test_accuracy"] == b[-1]["test_accuracy"]


def test_eval_compares_checkpoints(trained, tmp_path):
    root, _, _ = trained
    out = tmp_path / "eval"
    result = fastrob(
        "eval",
        "--checkpoint",
        str(root / "plain"),
        "--checkpoint",
        str(root / "pgd" / "checkpoint.pt"),
        "--n",
        "60",
        "--eps",
        "0.05,0.1",
        "--steps",
        "5",
        "--ara-n",
        "20",
        "--kl-steps",
        "3",
        "--attack-eps",
        "0",
        "--quiet",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    header, rows = parse_table(result.stdout)
    assert header == ["model", "clean", "linf", "0.05", "linf", "0.1", "ARA", "KL@0.1", "D@0.1", "NS@0.1"]
    assert list(rows) == ["plain", "PGD-AT linf eps=0.1"]
    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == 60
    plain = report["results"]["plain"]
    assert plain["curve"]["eps"] == [0.05, 0.1] and plain["ara"]["n"] == 20 and plain["kl"]["n"] == 60
    assert f"{plain['curve']['accuracy'][1]:.1%}" == rows["plain"][2]
    assert plain["interp"]["n"] == 60 and plain["interp"]["map"] == "saliency"  # the mlp has no CAM head
    assert f"{plain['interp']['mean']:.2f}" == rows["plain"][5]
    assert f"{plain['sensitivity']['mean']:.4f}" == rows["plain"][6] and plain["sensitivity"]["n"] == 60
    assert (out / "accuracy.png").is_file() and (out / "ara.png").is_file()


@pytest.mark.parametrize("attack, name", [("autoattack", "AutoAttack"), ("apgd", "APGD-CE"), ("pgd", "PGD-3")])
def test_eval_attack_and_masking_report(trained, tmp_path, attack, name):
    root, _, _ = trained
    out = tmp_path / "eval"
    result = fastrob(
        "eval",
        "--checkpoint",
        str(root / "plain"),
        "--n",
        "30",
        "--eps",
        "0.1",
        "--steps",
        "3",
        "--ara-n",
        "0",
        "--kl-eps",
        "0",
        "--interp-eps",
        "0",
        "--sens-eps",
        "0",
        "--attack",
        attack,
        "--attack-iterations",
        "5",
        "--queries",
        "50",
        "--masking-n",
        "30",
        "--quiet",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    header, rows = parse_table(result.stdout)
    short = {"autoattack": "AA", "apgd": "APGD", "pgd": "PGD"}[attack]
    assert header == ["model", "clean", "linf", "0.1", f"{short}@0.1", "masking"]
    assert "gradient-masking report" in result.stdout
    plain = json.loads((out / "eval.json").read_text())["results"]["plain"]
    assert plain["robust"]["attack"].startswith(name) and plain["robust"]["n"] == 30
    assert f"{plain['robust']['accuracy']:.1%}" == rows["plain"][2]
    assert plain["masking"]["n"] == 30 and set(plain["masking"]["checks"]) >= {"black_box", "ce_vs_dlr"}
    assert plain["masking"]["verdict"] in result.stdout.splitlines()[3]
    skipped = fastrob(
        "eval",
        "--checkpoint",
        str(root / "plain"),
        "--n",
        "30",
        "--eps",
        "0.1",
        "--steps",
        "3",
        "--ara-n",
        "0",
        "--kl-eps",
        "0",
        "--interp-eps",
        "0",
        "--sens-eps",
        "0",
        "--attack",
        attack,
        "--attack-iterations",
        "5",
        "--queries",
        "50",
        "--no-masking",
        "--quiet",
        "--out",
        str(out),
    )
    assert skipped.returncode == 0 and "masking" not in parse_table(skipped.stdout)[0]


def test_explain_writes_maps_and_surfaces(trained, tmp_path):
    root, _, _ = trained
    out = tmp_path / "explain"
    result = fastrob(
        "explain",
        "--checkpoint",
        str(root / "plain"),
        "--samples",
        "0,5",
        "--resolution",
        "9",
        "--quiet",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "explain.json").read_text())
    rows = report["models"]["plain"]
    assert [r["sample"] for r in rows] == [0, 5] and all(isinstance(r["margin"], float) for r in rows)
    assert (out / "saliency.png").is_file() and (out / "surfaces.png").is_file()


def test_train_and_eval_on_user_npz_data(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = np.clip(rng.random((60, 1, 6, 6)) * 0.3 + y[:, None, None, None] * 0.3, 0, 1).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    result = fastrob(
        "train",
        "--data",
        str(tmp_path / "d.npz"),
        "--model",
        "cnn",
        "--epochs",
        "2",
        "--quiet",
        "--out",
        str(tmp_path / "npz"),
    )
    assert result.returncode == 0, result.stderr
    assert "1x6x6" in result.stdout
    ev = fastrob(
        "eval",
        "--checkpoint",
        str(tmp_path / "npz"),
        "--eps",
        "0.1",
        "--steps",
        "2",
        "--ara-n",
        "0",
        "--kl-eps",
        "0",
        "--attack-eps",
        "0",
        "--quiet",
        "--out",
        str(tmp_path / "ev"),
    )
    assert ev.returncode == 0, ev.stderr
    header, rows = parse_table(ev.stdout)
    assert header == ["model", "clean", "linf", "0.1", "D@0.1", "NS@0.1"] and len(rows) == 1  # cnn: CAM maps
    skipped = fastrob(
        "eval",
        "--checkpoint",
        str(tmp_path / "npz"),
        "--eps",
        "0.1",
        "--steps",
        "2",
        "--ara-n",
        "0",
        "--kl-eps",
        "0",
        "--interp-eps",
        "0",
        "--sens-eps",
        "0",
        "--attack-eps",
        "0",
        "--quiet",
        "--out",
        str(tmp_path / "ev"),
    )
    assert skipped.returncode == 0, skipped.stderr
    assert parse_table(skipped.stdout)[0] == ["model", "clean", "linf", "0.1"]


@pytest.mark.parametrize(
    "setup, args, words",
    [
        ("missing", ["train", "--data", "{tmp}/nothing.npz"], "no such file"),
        ("bad_keys", ["train", "--data", "{tmp}/bad.npz"], "missing key(s) y"),
        ("bad_range", ["train", "--data", "{tmp}/bad.npz"], "must lie in [0, 1]"),
        ("missing", ["train", "--resume", "--out", "{tmp}/none"], "no checkpoint"),
        ("missing", ["eval", "--checkpoint", "{tmp}/none"], "no such file"),
        ("not_ckpt", ["eval", "--checkpoint", "{tmp}/fake.pt"], "not a fastrob checkpoint"),
        ("folder", ["train", "--data", "{tmp}/imgs"], "holds no PNG images"),
    ],
)
def test_bad_data_gives_one_clear_line(capsys, tmp_path, setup, args, words):
    if setup == "bad_keys":
        np.savez(tmp_path / "bad.npz", x=np.zeros((10, 1, 4, 4), np.float32))
    elif setup == "bad_range":
        np.savez(tmp_path / "bad.npz", x=np.full((10, 1, 4, 4), 3.0), y=np.zeros(10, int))
    elif setup == "not_ckpt":
        (tmp_path / "fake.pt").write_text("not a checkpoint")
    elif setup == "folder":
        (tmp_path / "imgs" / "a").mkdir(parents=True)
        (tmp_path / "imgs" / "b").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    if args[0] == "train" and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    code, out, err = in_process(capsys, *args)
    assert code == 2, out
    assert err.startswith("fastrob: error:") and words in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_data_from_the_command_line_has_no_traceback(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((10, 1, 4, 4), np.float32), y=np.zeros(9, int))
    result = fastrob("train", "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"fastrob: error: {tmp_path / 'bad.npz'}: y has 9 labels but x has 10 samples"


@pytest.mark.parametrize("command", ["info", "train", "eval", "explain", "demo"])
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = in_process(capsys, command, "--help")
    assert code == 0 and f"usage: fastrob {command}" in out


def test_checkpoint_and_data_that_do_not_fit(capsys, trained):
    root, _, _ = trained
    code, _, err = in_process(capsys, "eval", "--checkpoint", str(root / "plain"), "--size", "16", "--quiet")
    assert code == 2 and "does not take digits images of shape (1, 16, 16)" in err
    code, _, err = in_process(capsys, "explain", "--checkpoint", str(root / "plain"), "--samples", "500", "--quiet")
    assert code == 2 and "index 500 is out of range for 450 test images" in err


def test_train_warmup_flag(tmp_path):
    bad = fastrob("train", "--method", "int2", "--warmup", "3,1", "--out", str(tmp_path / "w"))
    assert bad.returncode == 2 and "START <= FULL" in bad.stderr
    wrong = fastrob("train", "--method", "pgd", "--warmup", "0,1", "--out", str(tmp_path / "w"))
    assert wrong.returncode == 2 and "warmup" in wrong.stderr


def test_explain_writes_adversarial_explanations(trained, tmp_path):
    root, _, _ = trained
    out = tmp_path / "expl"
    result = fastrob(
        "explain",
        "--checkpoint",
        str(root / "plain"),
        "--samples",
        "1,2",
        "--resolution",
        "5",
        "--target",
        "3",
        "--rho",
        "0.05",
        "--quiet",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "explain.json").read_text())
    assert report["targets"] == [3, 3] and report["rho"] == 0.05
    assert (out / "explanations_plain.png").is_file()
    bad = fastrob("explain", "--checkpoint", str(root / "plain"), "--target", "10", "--quiet", "--out", str(out))
    assert bad.returncode == 2 and "--target must be a class in [0, 10)" in bad.stderr
