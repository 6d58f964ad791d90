"""fastrob.evaluation with the evaluation attacks: the headline robust accuracy names its attack and the
masking report is in the results, the table and the JSON."""

import pytest
import torch

from fastrob import evaluation, metrics


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    x = torch.rand(24, 1, 4, 4)
    y = model(x).argmax(1)
    return model, x, y


def cheap(**kw):
    return evaluation.EvalSettings(
        eps=[0.05, 0.1],
        steps=5,
        ara_n=0,
        kl_eps=0,
        interp_eps=0,
        sens_eps=0,
        attack_steps=5,
        attack_queries=50,
        masking_n=24,
        masking_queries=50,
        **kw,
    )


@pytest.mark.parametrize("attack, name", [("autoattack", "AutoAttack"), ("apgd", "APGD-CE"), ("pgd", "PGD-5")])
def test_evaluate_names_the_headline_attack_and_has_the_masking_report(tiny, attack, name):
    model, x, y = tiny
    settings = cheap(attack=attack)
    results = evaluation.evaluate({"lin": model}, x, y, settings, quiet=True)
    js = evaluation.as_json(results)["lin"]
    assert js["robust"]["attack"].startswith(name)
    assert js["masking"]["verdict"] in ("ok", "suspicious") and "ce_vs_dlr" in js["masking"]["checks"]
    head = evaluation.table(results, settings).splitlines()[0].split()
    assert "masking" in head and any(h.endswith("@0.1") for h in head)
    assert "masking:" in evaluation.legend(settings)


def test_the_legend_counts_the_images_the_masking_report_read(tiny):
    model, x, y = tiny
    settings = cheap(attack="pgd")
    settings.masking_n = 500  # more than the 24 images there are
    results = evaluation.evaluate({"lin": model}, x, y, settings, quiet=True)
    assert results["lin"]["masking"].n == 24
    assert "masking report at the same eps on 24 images" in evaluation.legend(settings, results)


def test_no_masking_drops_the_column(tiny):
    model, x, y = tiny
    settings = evaluation.EvalSettings(
        eps=[0.1], steps=5, ara_n=0, kl_eps=0, interp_eps=0, sens_eps=0, attack="pgd", masking_n=0
    )
    results = evaluation.evaluate({"lin": model}, x, y, settings, quiet=True)
    assert "masking" not in results["lin"] and "masking" not in evaluation.table(results, settings)


def test_robust_accuracy_names_its_attack_and_autoattack_is_not_weaker_than_pgd(tiny):
    model, x, y = tiny
    aa = metrics.make_attack("autoattack", model, 0.1, steps=5, n_queries=50)
    pgd = metrics.make_attack("pgd", model, 0.1, steps=5)
    r_aa = metrics.robust_accuracy(model, (x, y), aa, quiet=True)
    r_pgd = metrics.robust_accuracy(model, (x, y), pgd, quiet=True)
    assert r_aa.as_dict()["attack"] == "AutoAttack(standard, Linf, eps=0.1, steps=5, n_queries=50)"
    assert r_pgd.attack.startswith("PGD-5(linf, eps=0.1")
    assert r_aa.accuracy <= r_pgd.accuracy + 1e-9
    assert metrics.robust_accuracy(model, (x, y), lambda a, b: a, quiet=True).attack == "<lambda>"


@pytest.mark.parametrize("attack", ["apgd", "autoattack", "factory"])
def test_accuracy_curve_with_another_attack_is_non_increasing_and_named(tiny, attack):
    model, x, y = tiny
    chosen = (lambda eps: metrics.make_attack("apgd", model, eps, steps=5)) if attack == "factory" else attack
    curve = metrics.accuracy_curve(model, (x, y), [0.1, 0.02, 0.05], steps=5, attack=chosen, quiet=True)
    assert curve.eps == [0.02, 0.05, 0.1]
    assert curve.accuracy == sorted(curve.accuracy, reverse=True) and curve.accuracy[0] <= curve.clean_accuracy
    assert ("AutoAttack" if attack == "autoattack" else "APGD-CE") in curve.as_dict()["attack"]


def test_bad_attack_names_are_rejected(tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match="attack must be one of"):
        metrics.accuracy_curve(model, (x, y), [0.1], attack="fgsm", quiet=True)
    with pytest.raises(ValueError, match="attack must be one of"):
        metrics.make_attack("cw", model, 0.1)
    with pytest.raises(TypeError, match="factory"):
        metrics.accuracy_curve(model, (x, y), [0.1], attack=3, quiet=True)
