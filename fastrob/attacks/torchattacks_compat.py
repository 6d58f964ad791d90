"""torchattacks-compatible attack classes (``Attack``, ``PGD``, ``PGDL2``, ``FGSM``) over the
functional ``fastrob.attacks.pgd``. As in torchattacks, the settings (``eps``, ``alpha``,
``steps``, ``random_start``, ... ) are plain attributes read at every call, so setting one after
construction takes effect; ``supported_mode`` lists the modes an attack accepts."""

from __future__ import annotations

import torch

from fastrob._checks import check_device
from fastrob.attacks.ball import attack_ball
from fastrob.attacks.projected_gradient import pgd
from fastrob.attacks.state import attack_context
from fastrob.distributed import unwrap

# the keyword arguments of ``pgd`` that are attack settings, hence attributes of the classes
EXTRA_OPTIONS = (
    "restarts",
    "loss",
    "robust_only",
    "early_stop",
    "backend",
    "amp",
    "cuda_graph",
    "clamp_input",
    "generator",
)


class Attack:
    """What fastrob's attacks share with ``torchattacks.Attack``: ``attack(images, labels)``,
    targeted modes, the model-mode setting and input normalisation. A subclass lists in
    ``options`` the attribute names it passes to ``pgd`` and sets ``norm``."""

    options: tuple = ()
    norm = "linf"

    def __init__(self, name, model):
        self.attack = name
        self.model = model
        try:
            self.device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            self.device = None
        self.attack_mode = "default"
        self.supported_mode = ["default", "targeted"]
        self.targeted = False
        self._target_map_function = None
        self._training = False
        self._normalization = None
        self._kth_min = 1
        # captured CUDA graphs of this attack object, replayed by later calls of the same shapes
        self._graph_cache = {}

    # modes, as torchattacks spells them; ``quiet`` is accepted, nothing is printed
    def get_mode(self):
        return self.attack_mode

    def set_mode_default(self):
        self.attack_mode, self.targeted, self._target_map_function = "default", False, None

    def _set_targeted(self, mode, fn):
        if "targeted" not in self.supported_mode:
            raise ValueError(f"{self.attack}: targeted mode is not supported (supported_mode = {self.supported_mode})")
        self.attack_mode, self.targeted, self._target_map_function = mode, True, fn

    def set_mode_targeted_by_label(self, quiet=False):
        self._set_targeted("targeted(label)", None)

    def set_mode_targeted_by_function(self, target_map_function, quiet=False):
        if not callable(target_map_function):
            raise TypeError(
                f"target_map_function must be callable (images, labels) -> target labels, got "
                f"{type(target_map_function).__name__}"
            )
        self._set_targeted("targeted(custom)", target_map_function)

    def set_mode_targeted_random(self, quiet=False):
        self._set_targeted("targeted(random)", self.get_random_target_label)

    def set_mode_targeted_least_likely(self, kth_min=1, quiet=False):
        if isinstance(kth_min, bool) or not isinstance(kth_min, int) or kth_min < 1:
            raise ValueError(f"kth_min must be an int >= 1, got {kth_min!r}")
        self._set_targeted("targeted(least-likely)", self.get_least_likely_label)
        self._kth_min = kth_min

    def set_model_training_mode(self, model_training=False, batchnorm_training=False, dropout_training=False):
        if not model_training:
            self._training = False
            return

        def set_modes(model):
            model.train()
            for m in model.modules():
                if (not batchnorm_training and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)) or (
                    not dropout_training and isinstance(m, torch.nn.modules.dropout._DropoutNd)
                ):
                    m.eval()

        self._training = set_modes

    def set_normalization_used(self, mean, std):
        """The model expects (x - mean) / std; the attack still takes and returns x in [0, 1]."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if not bool(torch.isfinite(mean).all()):
            raise ValueError(f"mean must be finite, got {mean.tolist()}")
        if not bool(torch.isfinite(std).all()) or not bool((std > 0).all()):
            raise ValueError(f"std must be positive and finite, got {std.tolist()}")
        self._normalization = (mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1))

    def set_device(self, device):
        """The device the inputs are moved to (None: where they are). Checked now: a device that
        cannot compute here (cuda without a GPU, meta) is refused in fastrob's words, not torch's."""
        self.device = None if device is None else check_device(device)

    def _model(self):
        model = unwrap(self.model)  # no DDP communication inside attacks (fastrob.distributed)
        if self._normalization is None:
            return model
        return _Normalized(model, *self._normalization)

    @torch.no_grad()
    def _clean_logits(self, images):
        model = self._model()
        with attack_context(model, False):
            return model(images)

    def get_random_target_label(self, images, labels=None):
        logits = self._clean_logits(images)
        labels = logits.argmax(1) if labels is None else labels
        shift = torch.randint(1, logits.shape[1], labels.shape, device=labels.device)
        return (labels + shift) % logits.shape[1]

    def get_least_likely_label(self, images, labels=None):
        logits = self._clean_logits(images)
        if self._kth_min > logits.shape[1] - 1:
            raise ValueError(
                f"kth_min must be at most the number of classes - 1 = {logits.shape[1] - 1} (the "
                f"true class is excluded), got {self._kth_min}"
            )
        labels = logits.argmax(1) if labels is None else labels
        masked = logits.scatter(1, labels[:, None], float("inf"))
        return masked.kthvalue(self._kth_min, dim=1).indices

    def get_target_label(self, images, labels=None):
        if self.attack_mode == "targeted(label)":
            return labels
        return self._target_map_function(images, labels)

    def settings(self) -> dict:
        """The ``pgd`` keyword arguments of this attack as its attributes say now."""
        return dict({name: getattr(self, name) for name in self.options}, norm=self.norm)

    def __call__(self, images, labels=None, **overrides):
        """Adversarial images for ``images`` [B, ...] in [0, 1] and ``labels`` [B] (None: the model's
        predictions). ``overrides`` replace the attributes for this call (any ``pgd`` keyword)."""
        return self.forward(images, labels, **overrides)

    def _on_device(self, images, labels):
        """images and labels moved to the attack's device (the model's, or ``set_device``'s)."""
        if self.device is not None and isinstance(images, torch.Tensor):
            images = images.to(self.device)
            labels = labels.to(self.device) if isinstance(labels, torch.Tensor) else labels
        return images, labels

    def forward(self, images, labels=None, **overrides):
        images, labels = self._on_device(images, labels)
        if self.targeted:
            if self._target_map_function is None and self.attack_mode != "targeted(label)":
                raise ValueError("the targeted mode has no target map function")
            labels = self.get_target_label(images, labels)
        return self._attack(self._model(), images, labels, dict(self.settings(), **overrides))

    def _attack(self, model, images, labels, options):
        """The attack proper on images and labels already on the device (targets when targeted)."""
        return pgd(
            model,
            images,
            labels,
            targeted=self.targeted,
            model_training=self._training,
            graph_cache=self._graph_cache,
            **options,
        )

    def describe(self) -> str:
        """A short name with the settings, as results report it (``fastrob.attacks.describe_attack``):
        here the class and its ball, e.g. "FGSM(linf, eps=0.1)"."""
        ball = attack_ball(self)
        return f"{type(self).__name__}({ball[0]}, eps={ball[1]:g})" if ball is not None else type(self).__name__

    def __repr__(self):
        shown = ", ".join(f"{k}={v}" for k, v in self.settings().items())
        return f"{self.attack}({shown}, attack_mode={self.attack_mode})"


class _Normalized(torch.nn.Module):
    """model((x - mean) / std), as a module so that the attack's mode handling reaches ``model``."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.mean, self.std = mean, std

    def forward(self, x):
        return self.model((x - self.mean.to(x)) / self.std.to(x))


class PGD(Attack):
    """Linf PGD (Madry et al. 2018), torchattacks.PGD's signature plus fastrob's extras.

    x' <- clamp(x + clamp(x' + alpha·sign(∇J) - x, -eps, eps), 0, 1), ``steps`` times, from a
    uniform start in the eps-box (``random_start``). See ``fastrob.attacks.pgd`` for the extras.
    """

    options = ("eps", "alpha", "steps", "random_start") + EXTRA_OPTIONS
    norm = "linf"

    def __init__(
        self,
        model,
        eps=8 / 255,
        alpha=2 / 255,
        steps=10,
        random_start=True,
        *,
        restarts=1,
        loss="ce",
        robust_only=False,
        early_stop=None,
        backend="auto",
        amp=None,
        cuda_graph=False,
        clamp_input=False,
        generator=None,
    ):
        super().__init__(type(self).__name__, model)
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
        self.restarts, self.loss, self.robust_only, self.early_stop = restarts, loss, robust_only, early_stop
        self.backend, self.amp, self.cuda_graph, self.clamp_input = backend, amp, cuda_graph, clamp_input
        self.generator = generator

    def describe(self) -> str:
        restarts = f", {self.restarts} restarts" if self.restarts > 1 else ""
        return f"PGD-{self.steps}({self.norm}, eps={self.eps:g}, alpha={self.alpha:g}{restarts})"


class PGDL2(PGD):
    """L2 PGD, torchattacks.PGDL2's signature plus fastrob's extras.

    x' <- clamp(x + Π_eps(x' + alpha·∇J/‖∇J‖₂ - x), 0, 1), Π_eps rescaling to norm <= eps; the
    random start is a Gaussian direction times a U(0,1)·eps radius. ``eps_for_division`` is
    accepted for compatibility: the fused step divides by the exact norm and skips zero gradients.
    """

    norm = "l2"

    def __init__(
        self,
        model,
        eps=1.0,
        alpha=0.2,
        steps=10,
        random_start=True,
        eps_for_division=1e-10,
        *,
        restarts=1,
        loss="ce",
        robust_only=False,
        early_stop=None,
        backend="auto",
        amp=None,
        cuda_graph=False,
        clamp_input=False,
        generator=None,
    ):
        super().__init__(
            model,
            eps,
            alpha,
            steps,
            random_start,
            restarts=restarts,
            loss=loss,
            robust_only=robust_only,
            early_stop=early_stop,
            backend=backend,
            amp=amp,
            cuda_graph=cuda_graph,
            clamp_input=clamp_input,
            generator=generator,
        )
        self.eps_for_division = eps_for_division


class FGSM(Attack):
    """FGSM (Goodfellow et al. 2015): x' = clamp(x + eps·sign(∇J), 0, 1), i.e. one PGD step with
    alpha = eps from x. torchattacks.FGSM's signature plus ``loss``, ``backend``, ``amp``."""

    options = ("eps", "loss", "backend", "amp", "clamp_input")
    norm = "linf"

    def __init__(self, model, eps=8 / 255, *, loss="ce", backend="auto", amp=None, clamp_input=False):
        super().__init__("FGSM", model)
        self.eps, self.loss, self.backend, self.amp, self.clamp_input = eps, loss, backend, amp, clamp_input

    def settings(self) -> dict:
        # one step of size eps from x, whatever eps is now
        return dict(super().settings(), alpha=self.eps, steps=1, random_start=False)
