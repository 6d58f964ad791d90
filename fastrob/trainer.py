"""Training runs behind ``fastrob train`` and ``fastrob demo``: a configuration, the objective it
names (plain, adversarial training or a regularizer), the loop with its progress bar, and
checkpoints that a later run resumes from.

An output directory holds
    checkpoint.pt   model + optimizer + RNG states + history + config (resumable)
    metrics.json    the config, the per-epoch history and the final clean test accuracy
    training.png    the training curves

Inside a ``torch.distributed`` process group of W > 1 ranks (``torchrun``, see
docs/distributed.md) ``train`` wraps the model in ``DistributedDataParallel``: every rank draws
the same permutation, each global batch of ``batch_size`` is cut into W nearly equal shards, and
the loss is weighted so that DDP's gradient average is the gradient of the global batch mean.
Only rank 0 shows the progress bar and writes the outputs.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

from fastrob import distributed as dist_utils
from fastrob import methods as method_registry
from fastrob._atomic import torch_save, write_json
from fastrob._checks import check_float, check_int, check_positive
from fastrob._progress import progress
from fastrob._rundir import data_path, read_checkpoint, run_lock
from fastrob.data import Dataset, load_dataset
from fastrob.models import ACTIVATIONS, MODELS, build_model
from fastrob.objective import Objective
from fastrob.regularizers.jsigr import SALIENCY_ESTIMATES

# the method list and each method's defaults live in one registry (fastrob.methods); these names
# are kept for the code that imports them from here
METHODS = method_registry.NAMES
INTERPRETATION_KINDS = tuple(m.name for m in method_registry.REGISTRY.values() if m.warmup)  # Boopathy et al. 2020
CHECKPOINT, METRICS, CURVE = "checkpoint.pt", "metrics.json", "training.png"


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in the checkpoint so that eval/explain/resume rebuild it.

    eps/alpha/attack_steps/norm configure the adversary of pgd/trades/half and the inner attacks
    of the int* kinds and sns (alpha default 2.5·eps/attack_steps); lam is the regularizer weight
    (input_gradient, jacobian, int*, sns; jsigr's lam_jacobian; lipschitz's fixed psi, adaptive
    when None), lam_saliency, patch and saliency_estimate are J-SIGR's; beta is TRADES'; warmup =
    [start, full] in epochs is the int* kinds' eps schedule (0 before start, a linear ramp to eps at
    full; Boopathy et al.)."""

    data: str = "digits"
    size: int | None = None
    model: str = "mlp"
    activation: str = "relu"
    method: str = "none"
    eps: float = 0.1
    alpha: float | None = None
    attack_steps: int = 7
    norm: str = "linf"
    beta: float = 6.0
    lam: float | None = None
    lam_saliency: float = 0.1
    warmup: list | None = None
    patch: int = 4
    saliency_estimate: str = "occlusion"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    test_fraction: float = 0.25

    def check(self) -> TrainConfig:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        from fastrob.attacks import check_norm

        check_norm(self.norm)
        check_float("eps", self.eps, min_value=0.0)
        if self.alpha is not None:
            check_float("alpha", self.alpha, min_value=0.0)
        check_int("attack_steps", self.attack_steps, 1)
        check_float("beta", self.beta, min_value=0.0)
        if self.lam is not None:
            check_float("lam", self.lam, min_value=0.0)
        check_float("lam_saliency", self.lam_saliency, min_value=0.0)
        if self.warmup is not None:
            if not isinstance(self.warmup, (list, tuple)) or len(self.warmup) != 2:
                raise ValueError(f"warmup must be [start, full] in epochs, got {self.warmup!r}")
            start, full = (check_float("warmup", w, min_value=0.0) for w in self.warmup)
            if full < start:
                raise ValueError(f"warmup must have start <= full, got {self.warmup!r}")
            if self.method not in INTERPRETATION_KINDS:
                raise ValueError(
                    f"warmup is the eps schedule of the int* methods {INTERPRETATION_KINDS}, not of {self.method!r}"
                )
            self.warmup = [start, full]
        check_int("patch", self.patch, 1)
        if self.saliency_estimate not in SALIENCY_ESTIMATES:
            raise ValueError(f"saliency_estimate must be one of {SALIENCY_ESTIMATES}, got {self.saliency_estimate!r}")
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_positive("lr", self.lr)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def describe(config: TrainConfig) -> str:
    """A short human name for the method and its parameters, e.g. 'PGD-AT linf eps=0.1'."""
    return method_registry.get(config.method).describe(config)


def build_objective(
    config: TrainConfig, model, steps_per_epoch: int = 1
) -> Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Objective]:
    """objective(model, x, y) -> Objective for the configured method (fastrob.methods; docs/methods.md).
    ``steps_per_epoch`` (training batches per epoch) turns ``config.warmup`` into calls."""
    method = method_registry.get(config.method)
    return method.build(config, model, method.lam(config), steps_per_epoch)


@torch.no_grad()
def recalibrate_batch_norm(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """ "Precise BN": the BatchNorm running statistics recomputed at the model's current weights,
    as the plain average of the batch statistics over the batches of ``x`` (train-mode forwards
    without gradient; momentum, num_batches_tracked and the model's mode are restored).

    Why: the exponential running averages lag behind weights that Adam moves fast. Measured on
    digits 16x16, SmallCNN with softplus after 4 epochs: 94% test accuracy with the batches' own
    statistics (train mode) but 30% in eval mode with the running ones, and 93% after this
    recalibration; the first epoch of every cnn run sat at chance in eval mode. Models without
    BatchNorm (tracking running statistics) are left alone at no cost."""
    norms = [
        m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    training = model.training
    model.train()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        model.train(training)
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Clean accuracy of ``model`` on (x, y). In a process group of W > 1 ranks every rank must call
    it with the same (x, y): rank r counts rows r, r + W, ... and the counts are summed."""
    model = dist_utils.unwrap(model)
    world, rank = dist_utils.world_size(), dist_utils.rank()
    if dist_utils.is_distributed():
        x, y = x[rank::world], y[rank::world]
    training = model.training
    model.eval()
    try:
        correct = sum(
            int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
            for i in range(0, len(y), batch_size)
        )
    finally:
        model.train(training)
    correct, total = (int(v) for v in dist_utils.all_reduce_sum([correct, len(y)]))
    return correct / max(total, 1)


def train(
    config: TrainConfig,
    out_dir: str | None = None,
    *,
    device: str = "cpu",
    resume: bool = False,
    quiet: bool = False,
    dataset: Dataset | None = None,
    desc: str | None = None,
):
    """Trains ``config`` (to ``config.epochs`` epochs in all) and returns (model, history, dataset).

    With ``out_dir``, writes checkpoint.pt after every epoch, and metrics.json + training.png at the
    end. ``resume=True`` continues from out_dir/checkpoint.pt: its config is used (with the
    ``epochs`` asked for now) and the model, optimizer and RNG states are restored, so an
    interrupted run resumed gives the run that was not interrupted.

    In a process group of W > 1 ranks (every rank calls ``train`` with the same arguments) the
    model trains as ``DistributedDataParallel`` (``device``: this rank's device), ``batch_size`` is
    the global batch, and only rank 0 shows the bar and writes files; the returned model is the
    unwrapped module. Module docstring and docs/distributed.md."""
    config.check()
    main = dist_utils.is_main_process()
    quiet = quiet or not main
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    state = None
    if resume:
        if not ckpt_path or not os.path.isfile(ckpt_path):
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
        state = read_checkpoint(ckpt_path)
        stored = TrainConfig.from_dict(dict(state["config"], epochs=config.epochs))
        ignored = resume_conflicts(config, stored, state.get("data_path"))
        if ignored and main:
            warnings.warn(
                f"--resume continues {ckpt_path} with its own settings; ignored: {', '.join(ignored)}", stacklevel=2
            )
        config = stored.check()
        if dataset is None and state.get("data_path") and not os.path.exists(config.data):
            config.data = state["data_path"]  # resumed from another directory
    with run_lock(out_dir if main else None):
        return _train(config, out_dir, ckpt_path, state, device=device, quiet=quiet, dataset=dataset, desc=desc)


def _train(config, out_dir, ckpt_path, state, *, device, quiet, dataset, desc):
    distributed, main = dist_utils.is_distributed(), dist_utils.is_main_process()
    world, rank = dist_utils.world_size(), dist_utils.rank()
    torch.manual_seed(config.seed)
    if dataset is None:
        dataset = load_dataset(config.data, config.size, config.test_fraction, config.seed)
    model = build_model(config.model, dataset.in_shape, dataset.num_classes, config.activation).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history, start_epoch = [], 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            # the objectives' random starts and draws on a GPU come from the CUDA generators
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history, start_epoch = state["history"], state["epoch"]
    net = model
    if distributed:
        # DDP broadcasts rank 0's parameters and buffers here; the default settings (no
        # find_unused_parameters, no static_graph) are what fastrob's objectives need least of
        # (docs/distributed.md)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device)] if torch.device(device).type == "cuda" else None
        )
    objective = build_objective(config, net, steps_per_epoch=-(-len(dataset.split.y_train) // config.batch_size))
    if state is not None and state.get("objective") is not None:
        objective.load_state_dict(state["objective"])  # Lipschitz's adaptive psi, Int's warm-up position
    split = dataset.split
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    x_test, y_test = split.x_test.to(device), split.y_test.to(device)
    n_batches = -(-len(y_train) // config.batch_size)
    bar = progress(
        total=(config.epochs - start_epoch) * n_batches,
        desc=desc or f"train {describe(config)}",
        disable=quiet,
        unit="batch",
    )
    for epoch in range(start_epoch, config.epochs):
        model.train()
        start = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "penalty": 0.0}
        seen = 0
        for idx in torch.randperm(len(y_train), generator=generator).split(config.batch_size):
            bar.update(1)
            if distributed:
                # this rank's shard of the global batch; a tail batch smaller than W is skipped by
                # every rank alike (an empty shard has no mean loss)
                if len(idx) < world:
                    continue
                global_size, idx = len(idx), torch.tensor_split(idx, world)[rank]
            idx = idx.to(device)
            out = objective(net, x_train[idx], y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss = out.loss
            if not distributed and not bool(torch.isfinite(loss.detach())):
                # one optimizer step on a NaN loss would make every weight NaN, and the saved checkpoint with it
                raise ValueError(
                    f"the training loss is {float(loss.detach())} at epoch {epoch + 1}: training diverged "
                    "(try a lower --lr); the checkpoint of the last finished epoch is kept"
                )
            if distributed:
                # DDP averages the ranks' gradients; weighting each shard's mean loss by
                # W * n_r / N makes that average the gradient of the global batch's mean loss
                loss = loss * (world * len(idx) / global_size)
            loss.backward()
            optimizer.step()
            for k in sums:
                sums[k] += float(getattr(out, k).detach()) * len(idx)
            seen += len(idx)
        recalibrate_batch_norm(model, x_train, config.batch_size)
        if distributed:
            totals = dist_utils.all_reduce_sum([sums["loss"], sums["ce"], sums["penalty"], seen])
            sums, seen = dict(zip(sums, totals[:3].tolist())), int(totals[3])
            # every rank recalibrated on the same data and weights, equal up to float reductions:
            # evaluate, and save, rank 0's statistics
            dist_utils.broadcast_buffers(model)
        record = {k: v / max(seen, 1) for k, v in sums.items()}
        record.update(
            epoch=epoch + 1,
            seconds=time.perf_counter() - start,
            train_accuracy=accuracy(model, x_train, y_train),
            test_accuracy=accuracy(model, x_test, y_test),
        )
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", test_acc=f"{record['test_accuracy']:.3f}")
        if ckpt_path and main:
            # atomic (fastrob._atomic): a full disk or an interrupt never leaves a half-written checkpoint
            torch_save(
                {
                    "config": asdict(config),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "epoch": epoch + 1,
                    "history": history,
                    "in_shape": dataset.in_shape,
                    "num_classes": dataset.num_classes,
                    "objective": objective.state_dict() if hasattr(objective, "state_dict") else None,
                    "data_path": data_path(config.data),
                },
                ckpt_path,
            )
        dist_utils.barrier()  # no rank starts the next epoch (or returns) before the checkpoint exists
    bar.close()
    model.eval()
    if out_dir and main:
        write_outputs(out_dir, config, history)
    dist_utils.barrier()
    return model, history, dataset


def write_outputs(out_dir: str, config: TrainConfig, history: list[dict]) -> None:
    from fastrob import plots

    final = history[-1] if history else {}
    summary = {
        "config": asdict(config),
        "method": describe(config),
        "epochs": len(history),
        "test_accuracy": final.get("test_accuracy"),
        "train_seconds": sum(h["seconds"] for h in history),
        "history": history,
    }
    write_json(summary, os.path.join(out_dir, METRICS))
    plots.training_curves(history, os.path.join(out_dir, CURVE), title=describe(config))


def resume_conflicts(given: TrainConfig, stored: TrainConfig, stored_data_path: str | None = None) -> list[str]:
    """The settings of ``given`` that a resume of ``stored`` ignores: those set away from their
    default and different from the checkpoint's (``epochs`` is the one a resume takes). The data
    counts as the same when both name one file (relative to here, or the recorded absolute path)."""
    defaults = TrainConfig()
    out = []
    for f in fields(TrainConfig):
        if f.name == "epochs":
            continue
        value, kept = getattr(given, f.name), getattr(stored, f.name)
        if (
            f.name == "data"
            and data_path(value) is not None
            and data_path(value) in (stored_data_path, data_path(kept))
        ):
            continue
        if value != getattr(defaults, f.name) and value != kept:
            out.append(f"{f.name}={value!r} (the checkpoint's {kept!r})")
    return out


def load_checkpoint(path: str, device: str = "cpu"):
    """(model in eval mode, TrainConfig) from a checkpoint.pt, or from a directory holding one.
    A relative data path that does not resolve from here is replaced by the absolute one recorded
    at training time."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: no such file {path}")
    state = read_checkpoint(path)
    try:
        config = TrainConfig.from_dict(state["config"])
        model = build_model(config.model, state["in_shape"], state["num_classes"], config.activation)
        model.load_state_dict(state["model"])
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a fastrob checkpoint ({type(err).__name__}: {reason})") from None
    if state.get("data_path") and not os.path.exists(config.data):
        config.data = state["data_path"]
    return model.to(device).eval(), config
