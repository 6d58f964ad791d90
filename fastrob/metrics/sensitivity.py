"""Neuron sensitivity (Zhang, Liu et al., IEEE TIP; arXiv 1909.06978; docs/methods.md#neuron-sensitivity): how
much each channel of each layer moves between benign inputs and their adversarial examples.

    sigma(l, c) = (1/N) sum_k ||F_lc(x'_k) - F_lc(x_k)||_1 / dim(F_lc)

F_lc(x) is channel c of layer l's output for input x (for an output [B, C, *rest], the
prod(rest) elements of channel c; a Linear layer's channels are its single features). Sensitive
neurons are those with the largest sigma; a layer's sensitivity is the mean over its channels.

Which layers (``layers=None``): the activation modules of the model (``ACTIVATION_TYPES``, which
includes fastrob's ``BiasAct``), i.e. the post-activation feature maps the paper calls neurons;
a model without activation modules falls back to its Conv/Linear layers except the last one
(the logits). A module called several times in one forward (a shared ``nn.ReLU``, as in
torchvision's ResNet blocks) gives one layer per call: ``name``, ``name#1``, ``name#2``, ...
``layers`` may also name modules (``dict(model.named_modules())`` keys) or pass the modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch
from torch import nn

from fastrob._checks import check_float, check_int, check_model, check_tensor
from fastrob._progress import progress
from fastrob.attacks import attack_context, check_norm, default_alpha, pgd
from fastrob.distributed import all_gather_objects, unwrap
from fastrob.metrics._common import batches, model_device, shard
from fastrob.nn import BiasAct

ACTIVATION_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardtanh,
    BiasAct,
)


# ---- layers and hooks ---------------------------------------------------------------------------


def default_layers(model: nn.Module) -> list[str]:
    """The names of the modules whose outputs neuron sensitivity watches by default (see the
    module docstring): the activation modules, else every Conv/Linear layer but the last."""
    named = [(n, m) for n, m in model.named_modules() if n]
    acts = [n for n, m in named if isinstance(m, ACTIVATION_TYPES)]
    if acts:
        return acts
    linear = [n for n, m in named if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    return linear[:-1]


def resolve_layers(model, layers=None) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs for ``layers``: None (``default_layers``), or an iterable of module
    names and/or modules of ``model``. Raises if none is found or a name or module is not in it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (hooks need modules), got {type(model).__name__}")
    named = dict(model.named_modules())
    if layers is None:
        chosen = default_layers(model)
        if not chosen:
            raise ValueError(
                "model has no activation module and no Conv/Linear layer before the last one: pass "
                "layers=[module names] to choose the layers to watch"
            )
        return [(n, named[n]) for n in chosen]
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    names_of = {id(m): n for n, m in named.items()}
    out = []
    for item in layers:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"layers: model has no module named {item!r} (see dict(model.named_modules()))")
            out.append((item, named[item]))
        elif isinstance(item, nn.Module):
            if id(item) not in names_of:
                raise ValueError(f"layers: the module {type(item).__name__} is not a submodule of model")
            out.append((names_of[id(item)], item))
        else:
            raise TypeError(f"layers must hold module names or modules, got {type(item).__name__}")
    if not out:
        raise ValueError("layers must name at least one module")
    return out


class FeatureRecorder:
    """Forward hooks that record the chosen layers' outputs, keyed ``name`` (first call in a
    forward), ``name#1``, ... (later calls). Use as a context manager: the hooks are removed on
    exit, also after an exception. ``features`` is cleared by ``clear()``."""

    def __init__(self, model, layers=None, detach: bool = False):
        self.layers = resolve_layers(model, layers)
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles = []

    def _hook(self, name):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor: choose another layer")
            i = self._counts.get(name, 0)
            self._counts[name] = i + 1
            self.features[name if i == 0 else f"{name}#{i}"] = output.detach() if self.detach else output

        return hook

    def clear(self) -> None:
        self.features, self._counts = {}, {}

    def __enter__(self):
        try:
            for name, module in self.layers:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def channel_deviation(f_adv: torch.Tensor, f_clean: torch.Tensor) -> torch.Tensor:
    """Per sample and channel ||F_c(x') - F_c(x)||_1 / dim(F_c): [B, C] for outputs [B, C, *rest]
    ([B, 1] for a [B] output), in float32 at least."""
    if f_adv.shape != f_clean.shape:
        raise ValueError(
            f"a layer's output changed shape between x and x_adv: {tuple(f_clean.shape)} vs {tuple(f_adv.shape)}"
        )
    diff = f_adv - f_clean
    if diff.dtype in (torch.float16, torch.bfloat16):
        diff = diff.float()
    if diff.dim() == 1:
        diff = diff[:, None]
    return diff.abs().flatten(2).mean(2) if diff.dim() > 2 else diff.abs()


# ---- the metric ---------------------------------------------------------------------------------


@dataclass
class NeuronSensitivity:
    """sigma: layer name -> per-channel sensitivity [C] (float64, cpu), in forward order; n: the
    number of benign/adversarial pairs. ``layer_means``: the mean over each layer's channels (the
    paper's layer sensitivity); ``mean``: the mean of the layer means (every layer counts the same,
    whatever its width)."""

    sigma: dict = field(repr=False)
    n: int

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.sigma[name]

    def __iter__(self):
        return iter(self.sigma)

    def __len__(self):
        return len(self.sigma)

    def keys(self):
        return self.sigma.keys()

    def items(self):
        return self.sigma.items()

    @property
    def layer_means(self) -> dict:
        return {name: float(s.mean()) for name, s in self.sigma.items()}

    @property
    def mean(self) -> float:
        means = list(self.layer_means.values())
        return sum(means) / len(means) if means else 0.0

    def top_k(self, k=0.1) -> dict:
        """layer name -> indices of its top-k sensitive channels (``top_k_sensitive``)."""
        return top_k_sensitive(self.sigma, k)

    def as_dict(self) -> dict:
        return {
            "mean": self.mean,
            "n": self.n,
            "layers": self.layer_means,
            "channels": {name: int(s.numel()) for name, s in self.sigma.items()},
        }


def top_k_count(channels: int, k) -> int:
    """How many channels "top k" means: an int k >= 1 is a count (capped at ``channels``); a float
    k in (0, 1] is a fraction, ceil(k * channels), at least 1."""
    if isinstance(k, bool):
        raise TypeError("k must be a fraction in (0, 1] or a count >= 1, got bool")
    if isinstance(k, Integral):
        return min(check_int("k", k, 1), channels)
    if not isinstance(k, Real):
        raise TypeError(f"k must be a fraction in (0, 1] or a count >= 1, got {type(k).__name__}")
    k = check_float("k", k)
    if not 0 < k <= 1:
        raise ValueError(f"k as a fraction must be in (0, 1], got {k}")
    return max(1, min(channels, math.ceil(k * channels - 1e-9)))  # 1e-9: 0.1 * 30 is 3.0000000000000004


def top_k_sensitive(sigma, k=0.1):
    """The indices of the most sensitive channels, most sensitive first: for a [C] tensor, a
    LongTensor of ``top_k_count(C, k)`` indices; for a mapping (or a ``NeuronSensitivity``) of
    layer -> sigma, a dict of those per layer. Ties go to the lower index (stable sort)."""
    if isinstance(sigma, NeuronSensitivity):
        sigma = sigma.sigma
    if isinstance(sigma, Mapping):
        return {name: top_k_sensitive(s, k) for name, s in sigma.items()}
    check_tensor("sigma", sigma)
    if sigma.dim() != 1:
        raise ValueError(f"sigma must be a [C] tensor of per-channel sensitivities, got shape {tuple(sigma.shape)}")
    count = top_k_count(sigma.numel(), k)
    return torch.sort(sigma.detach(), descending=True, stable=True).indices[:count]


def _accumulate(totals: dict, model, x, x_adv, recorder) -> None:
    recorder.clear()
    model(x)
    clean = recorder.features
    recorder.clear()
    model(x_adv)
    adv = recorder.features
    if clean.keys() != adv.keys():
        raise ValueError(f"the watched layers ran differently on x and x_adv: {sorted(clean)} vs {sorted(adv)}")
    for name in clean:
        dev = channel_deviation(adv[name], clean[name]).double().sum(0)
        if name in totals and totals[name].shape != dev.shape:
            raise ValueError(f"layer {name!r} changed its number of channels between batches")
        totals[name] = totals[name] + dev if name in totals else dev


def neuron_sensitivity(
    model, x: torch.Tensor, x_adv: torch.Tensor, layers=None, *, batch_size: int = 256, quiet: bool = True
) -> NeuronSensitivity:
    """sigma(l, c) over the pairs (x_k, x_adv_k), for the layers ``layers`` (module docstring).

    Both forwards run in eval mode under no_grad (BatchNorm uses its running statistics, so each
    sample's features do not depend on the rest of the batch); the model's modes and
    requires_grad flags are restored, and the hooks are removed, also after an exception.

    Args:
        model: an nn.Module mapping [B, ...] to logits.
        x, x_adv: benign inputs and their adversarial (or any perturbed) versions, the same shape.
        layers: None (default layers) or module names / modules.
        batch_size: pairs per forward.
        quiet: hide the progress bar.
    """
    check_model(model)
    model = unwrap(model)  # a DDP model's wrapped module: its layer names, no communication
    check_tensor("x", x, min_dim=2)
    check_tensor("x_adv", x_adv, min_dim=2)
    if x.shape != x_adv.shape:
        raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    batch_size = check_int("batch_size", batch_size, 1)
    totals: dict = {}
    with attack_context(model), torch.no_grad(), FeatureRecorder(model, layers, detach=True) as rec:
        for i in progress(range(0, len(x), batch_size), desc="neuron sensitivity", unit="batches", disable=quiet):
            _accumulate(totals, model, x[i : i + batch_size], x_adv[i : i + batch_size].to(x.device), rec)
    return NeuronSensitivity({k: (v / max(len(x), 1)).cpu() for k, v in totals.items()}, len(x))


def neuron_sensitivity_metric(
    model,
    data,
    attack: Callable | None = None,
    *,
    eps: float = 0.1,
    norm: str = "linf",
    steps: int = 10,
    alpha: float | None = None,
    layers=None,
    batch_size: int = 256,
    seed: int = 0,
    device=None,
    quiet: bool = False,
    n: int | None = None,
    distributed: bool | None = None,
) -> NeuronSensitivity:
    """Neuron sensitivity of ``model`` over ``data`` (a pair (x, y) or a DataLoader), each benign
    input paired with its adversarial example from ``attack(x, y)`` (any callable; default: PGD
    from ``fastrob.attacks.pgd`` with ``eps``, ``norm``, ``steps``, step ``alpha`` = 2.5·eps/steps,
    a random start drawn from a generator seeded with ``seed``, against the true labels). ``n``:
    use only the first n samples. The shape of ``evaluation.EVAL_METRICS``' functions.

    Distributed (as ``fastrob.metrics.robust_accuracy``): with a DistributedSampler-sharded loader
    (or ``distributed=True``) each rank attacks its shard (the default PGD's generator seeded with
    seed + rank) and the per-channel sums are gathered, so every rank gets the global result."""
    check_model(model)
    model = unwrap(model)  # a DDP model's wrapped module: no communication in attacks and forwards
    device = model_device(model, device)
    eps = check_float("eps", eps, min_value=0.0)
    steps = check_int("steps", steps, 0)
    alpha = default_alpha(eps, steps) if alpha is None else check_float("alpha", alpha, min_value=0.0)
    check_norm(norm)
    if attack is not None and not callable(attack):
        raise TypeError(f"attack must be callable as attack(x, y) -> x_adv, got {type(attack).__name__}")
    names = [name for name, _ in resolve_layers(model, layers)]  # checked once, before any attack
    part = shard(data, n, distributed)
    generator = torch.Generator(device=device).manual_seed(seed + (part.rank if part is not None else 0))
    totals: dict = {}
    count = 0
    for x, y in batches(data, batch_size, device, desc="neuron sensitivity", quiet=quiet, limit=n, shard=part):
        if attack is None:
            x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=generator)
        else:
            x_adv = attack(x, y)
        # hooks only around the two forwards that count, not the attack's
        with attack_context(model), torch.no_grad(), FeatureRecorder(model, names, detach=True) as rec:
            _accumulate(totals, model, x, x_adv.detach().to(x.device), rec)
        count += len(y)
    if part is not None:
        # a rank that read no sample does not know the layers' channel counts: gather objects
        gathered, totals, count = all_gather_objects(({k: v.cpu() for k, v in totals.items()}, count)), {}, 0
        for rank_totals, rank_count in gathered:
            for k, v in rank_totals.items():
                totals[k] = totals[k] + v if k in totals else v
            count += rank_count
    return NeuronSensitivity({k: (v / max(count, 1)).cpu() for k, v in totals.items()}, count)
