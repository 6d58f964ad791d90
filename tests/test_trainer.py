"""fastrob.trainer: the paper methods (docs/methods.md) behind `fastrob train --method`, and checkpoints that carry an
objective's own state (the Lipschitz regularizer's adaptive psi, the Int warm-up position)."""

import math

import pytest
import torch

from fastrob import regularizers, trainer
from fastrob.trainer import TrainConfig, describe, train


@pytest.mark.parametrize(
    "method, model, name",
    [
        ("int", "cnn", "Int lam=0.01 linf eps=0.1"),
        ("int_adv", "cnn", "Int-Adv lam=0.01 linf eps=0.1"),
        ("int2", "mlp", "Int2 lam=0.01 linf eps=0.1"),
        ("int2_adv", "mlp", "Int2-Adv lam=0.01 linf eps=0.1"),
        ("lipschitz", "mlp", "Lipschitz psi=adaptive"),
        ("sns", "mlp", "SNS lam=1 linf eps=0.1"),
    ],
)
def test_seed_methods_train_from_the_config(method, model, name, one_thread):
    # SNS's default lam = 1 suits ReLU; with a smooth activation it needs a smaller lam (sns.py)
    activation = "relu" if method == "sns" else "softplus"
    config = TrainConfig(method=method, model=model, activation=activation, epochs=2, attack_steps=2, seed=1)
    assert describe(config) == name
    objective = trainer.build_objective(config, trainer.build_model(model, (1, 8, 8), 10, "softplus"))
    expected = {"lipschitz": regularizers.LipschitzRegularizer, "sns": regularizers.SNSRegularizer}
    assert isinstance(objective, expected.get(method, regularizers.InterpretationRegularizer))
    if method.startswith("int"):
        # the cnn's GAP head gives CAM maps; models without one use input-gradient saliency
        assert objective.kind == method and objective.map == ("cam" if model == "cnn" else "saliency")
    _, history, _ = train(config, quiet=True)
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["penalty"] > 0  # the method's penalty (D, |ds/dx|^2, sigma) is in the loss
    assert history[-1]["test_accuracy"] > 0.2  # chance is 0.1: it learned something in two epochs


def test_lam_fixes_the_lipschitz_psi():
    objective = trainer.build_objective(TrainConfig(method="lipschitz", lam=5.0), None)
    assert not objective.adaptive and objective.psi == 5.0
    assert describe(TrainConfig(method="lipschitz", lam=5.0)) == "Lipschitz psi=5"


def test_resume_restores_the_objective_state(tmp_path, monkeypatch, one_thread):
    # a target loss above digits' CE makes the adaptive R grow every batch, so the psi of the
    # resumed epochs depends on the R saved in the checkpoint
    build = trainer.build_objective
    monkeypatch.setattr(
        trainer,
        "build_objective",
        lambda config, model, **kw: (
            regularizers.LipschitzRegularizer(target_loss=3.0)
            if config.method == "lipschitz"
            else build(config, model, **kw)
        ),
    )
    config = dict(method="lipschitz", activation="softplus", epochs=3, seed=2)
    _, straight, _ = train(TrainConfig(**config), quiet=True)
    out = str(tmp_path / "run")
    train(TrainConfig(**dict(config, epochs=2)), out, quiet=True)
    saved = torch.load(f"{out}/checkpoint.pt", weights_only=True)["objective"]
    assert saved["R"] > 1.0
    _, resumed, _ = train(TrainConfig(**config), out, resume=True, quiet=True)
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight], rel=1e-6)


def test_recalibrate_batch_norm_averages_the_batch_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3),
        torch.nn.BatchNorm2d(3, momentum=0.3),
        torch.nn.Softplus(),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(4),
    )
    x = torch.rand(10, 1, 6, 6)
    model(x)  # moves the running statistics away from their reset values
    model.eval()
    trainer.recalibrate_batch_norm(model, x, batch_size=4)
    bn = model[1]
    with torch.no_grad():
        h = [model[0](x[i : i + 4]) for i in (0, 4, 8)]  # batches of 4, 4, 2
    mean = torch.stack([t.mean((0, 2, 3)) for t in h]).mean(0)
    var = torch.stack([t.transpose(0, 1).flatten(1).var(1, unbiased=True) for t in h]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert not model.training and bn.momentum == 0.3 and int(bn.num_batches_tracked) == 1


def test_cnn_eval_accuracy_follows_training(one_thread):
    # before recalibration, the cnn's eval-mode accuracy sat near chance while train-mode BN gave 94%
    config = TrainConfig(model="cnn", size=16, activation="softplus", epochs=3, seed=0)
    model, history, dataset = train(config, quiet=True)
    x, y = dataset.split.x_test, dataset.split.y_test
    with torch.no_grad():
        train_mode = float((model.train()(x).argmax(1) == y).float().mean())
    model.eval()
    assert history[-1]["test_accuracy"] > 0.8 and history[-1]["test_accuracy"] > train_mode - 0.05


def test_int_warmup_schedule_in_epochs_and_resume(tmp_path, one_thread):
    # eps is 0 (no attack, no penalty) through epoch 1, ramps over epoch 2; a run resumed after
    # epoch 1 continues the schedule from the checkpointed call count
    config = dict(method="int2", warmup=[1, 2], epochs=3, attack_steps=2, seed=4)
    _, straight, _ = train(TrainConfig(**config), quiet=True)
    assert straight[0]["penalty"] == 0 and straight[1]["penalty"] > 0 and straight[2]["penalty"] > 0
    out = str(tmp_path / "run")
    train(TrainConfig(**dict(config, epochs=1)), out, quiet=True)
    _, resumed, _ = train(TrainConfig(**config), out, resume=True, quiet=True)
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight], rel=1e-6)


@pytest.mark.parametrize(
    "warmup, method, match",
    [
        ([2, 1], "int2", "start <= full"),
        ([1], "int2", r"\[start, full\]"),
        ([0, 1], "pgd", "int"),
    ],
)
def test_bad_warmup(warmup, method, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(method=method, warmup=warmup).check()
