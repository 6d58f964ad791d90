"""fastrob.methods: the registry of training methods behind `fastrob train --method`, `describe`
and `build_objective`."""

import math

import pytest
import torch

from fastrob import methods
from fastrob.cli import build_parser
from fastrob.models import build_model
from fastrob.trainer import INTERPRETATION_KINDS, METHODS, TrainConfig, build_objective, describe

# each method's default lam, as the registry holds it (None: the method has no lam, or lipschitz's adaptive psi)
DEFAULT_LAM = {m.name: m.default_lam for m in methods.REGISTRY.values() if m.default_lam is not None}

# What describe printed before the registry (the if-chains of fastrob.trainer at commit 00c49cb,
# run once): the default config, and one with every parameter describe reads changed.
OTHER = dict(lam=0.5, norm="l2", eps=0.25, beta=2.0, lam_saliency=0.3)
OLD_DESCRIPTIONS = {
    "none": ("plain", "plain"),
    "pgd": ("PGD-AT linf eps=0.1", "PGD-AT l2 eps=0.25"),
    "trades": ("TRADES b=6 linf eps=0.1", "TRADES b=2 l2 eps=0.25"),
    "half": ("half-AT linf eps=0.1", "half-AT l2 eps=0.25"),
    "input_gradient": ("input grad lam=0.1", "input grad lam=0.5"),
    "jacobian": ("Jacobian lam=0.01", "Jacobian lam=0.5"),
    "jsigr": ("J-SIGR lam=0.01,0.1", "J-SIGR lam=0.5,0.3"),
    "int": ("Int lam=0.01 linf eps=0.1", "Int lam=0.5 l2 eps=0.25"),
    "int_adv": ("Int-Adv lam=0.01 linf eps=0.1", "Int-Adv lam=0.5 l2 eps=0.25"),
    "int2": ("Int2 lam=0.01 linf eps=0.1", "Int2 lam=0.5 l2 eps=0.25"),
    "int2_adv": ("Int2-Adv lam=0.01 linf eps=0.1", "Int2-Adv lam=0.5 l2 eps=0.25"),
    "lipschitz": ("Lipschitz psi=adaptive", "Lipschitz psi=0.5"),
    "sns": ("SNS lam=1 linf eps=0.1", "SNS lam=0.5 l2 eps=0.25"),
}


def test_the_registry_holds_the_methods_there_were():
    assert METHODS == methods.NAMES == tuple(OLD_DESCRIPTIONS)
    # the defaults the trainer's constants held before the registry
    assert DEFAULT_LAM == {
        "input_gradient": 0.1,
        "jacobian": 0.01,
        "jsigr": 0.01,
        "sns": 1.0,
        "int": 0.01,
        "int_adv": 0.01,
        "int2": 0.01,
        "int2_adv": 0.01,
    }
    assert INTERPRETATION_KINDS == ("int", "int_adv", "int2", "int2_adv")


@pytest.mark.parametrize("method", list(OLD_DESCRIPTIONS))
def test_describe_is_unchanged(method):
    default, other = OLD_DESCRIPTIONS[method]
    assert describe(TrainConfig(method=method)) == default
    assert describe(TrainConfig(method=method, **OTHER)) == other


def test_an_unknown_method_is_named():
    with pytest.raises(ValueError, match="method must be one of .*'dropout'"):
        describe(TrainConfig(method="dropout"))
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="dropout").check()


def _method_action(parser):
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    return next(a for a in train._actions if a.dest == "method")


def test_the_cli_offers_the_registry():
    action = _method_action(build_parser())
    assert tuple(action.choices) == methods.NAMES
    for m in methods.REGISTRY.values():  # every method and its default lam are in the help
        assert f"{m.name}: {m.help}" in action.help
        if m.default_lam is not None:
            assert f"{m.name}: {m.help} (default lam {m.default_lam:g})" in action.help


@pytest.mark.parametrize("method", list(OLD_DESCRIPTIONS))
def test_every_method_builds_an_objective_that_trains_one_step(method, one_thread):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, "softplus")
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    config = TrainConfig(method=method, attack_steps=1, lam=None if method == "lipschitz" else 0.1).check()
    objective = build_objective(config, model, steps_per_epoch=3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = objective(model, x, y)
    assert out.logits.shape == (6, 10) and out.loss.shape == () and math.isfinite(float(out.loss.detach()))
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # the objective is the method's: the loss is CE plus lam times the penalty where the method
    # has a lam (and the penalty is part of the loss, not only reported)
    if method in DEFAULT_LAM and method not in ("sns", "int_adv", "int2_adv", "jsigr"):
        torch.testing.assert_close(out.loss.detach(), (out.ce + 0.1 * out.penalty).detach())
    if method == "none":
        assert float(out.penalty) == 0.0


def test_build_passes_the_default_lam_and_the_warmup():
    objective = build_objective(TrainConfig(method="jacobian"), None)
    assert objective.lam == 0.01
    model = build_model("mlp", (1, 8, 8), 10, "relu")
    objective = build_objective(TrainConfig(method="int2", warmup=[1, 2]).check(), model, steps_per_epoch=5)
    assert objective.lam == 0.01 and objective.warmup == (5, 10)


def test_jsigr_saliency_estimate_from_the_command_line_to_the_checkpoint(tmp_path, one_thread):
    from fastrob.cli import main
    from fastrob.trainer import load_checkpoint

    out = tmp_path / "run"
    args = ["train", "--method", "jsigr", "--saliency-estimate", "linear", "--patch", "2", "--epochs", "1"]
    assert main([*args, "--batch-size", "256", "--quiet", "--out", str(out)]) == 0
    config = load_checkpoint(str(out))[1]
    assert config.saliency_estimate == "linear" and describe(config) == "J-SIGR lam=0.01,0.1,linear"
    reg = build_objective(config, build_model("mlp", (1, 8, 8), 10, "softplus"))
    assert (reg.saliency_estimate, reg.patch) == ("linear", 2)
    assert TrainConfig(method="jsigr").check().saliency_estimate == "occlusion"
    with pytest.raises(ValueError, match="saliency_estimate must be one of"):
        TrainConfig(method="jsigr", saliency_estimate="exact").check()
