"""J-SIGR (Liu et al. 2022/2024): Jacobian normalization plus selective input-gradient
regularization toward a perturbation saliency map. docs/methods.md#j-sigr: the paper's exact loss
was not recoverable, so this is fastrob's documented default."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrob import functional as Fn
from fastrob._checks import check_float, check_int
from fastrob.compiled import eager_for_double_backward
from fastrob.distributed import unwrap
from fastrob.objective import Objective
from fastrob.regularizers.input_gradient import check_backend
from fastrob.routing import twice_differentiable

PERTURBATIONS = ("mean", "blur")
SALIENCY_ESTIMATES = ("occlusion", "linear")
# perturbed images per saliency forward when ``chunk`` is None (measured on CPU: one forward of 16
# images per square was 2x faster than one pass of all 64 squares at patch 4)
DEFAULT_CHUNK_CPU = 16
DEFAULT_CHUNK_ACCELERATOR = 4096


class JSIGRRegularizer:
    """loss = mean_i CE_i + lam_jacobian * 1/2 ||J||_F^2 / B + lam_saliency * mean_i ||(1 - S_i) * g_i||_2^2.

    J = d logits / d x, estimated with ``n_proj`` random projections as in ``JacobianRegularizer``
    (VJPs on the shared forward's graph); g_i = d(sum_j CE_j)/dx_i, by double backprop. S_i is
    sample i's perturbation saliency, computed without gradient: the image is cut into
    patch x patch squares; for each square k, drop_ik = max(0, p_y(x_i) - p_y(x_i with square k
    replaced)), the replacement being the sample's per-channel mean ("mean") or a 3x3 box blur of
    the image ("blur"); S_i = drop_i / max_k drop_ik (0 where no square lowers p_y), constant over
    each square and the channels. The input gradient is thereby suppressed where the saliency says
    the input does not matter, so that the gradient explanation imitates the saliency map.

    ``Objective.penalty`` is the weighted sum lam_jacobian * R_J + lam_saliency * R_S (two terms,
    so there is no single unweighted penalty): loss = ce + penalty.

    The saliency forwards run in the model's mode and do not move BatchNorm's running statistics;
    in train mode each square's B perturbed images are normalised with their own batch statistics,
    as in a forward of that square alone, so S does not depend on ``chunk``. Cost: one no-grad
    forward of the batch per square, (H/patch)(W/patch) of them (64 at patch 4 on 32x32 images,
    16 at patch 8). A plain training step costs about 3 forwards, so K squares put a floor of
    about K/3 plain steps under a J-SIGR step whatever the batching (bench/any_model.py: about 25x
    a plain step at patch 4, 9x at patch 8 on a 2-core CPU): use patch 8 or larger, or
    saliency_estimate="linear" (below), where the step must be cheap. Inputs must be images [B, C, H, W].

    ``saliency_estimate="linear"`` replaces the occlusion forwards by their first-order estimate
    (an approximation, not the default): p_y(x_i) - p_y(x_i with square k replaced) ~
    p_y(x_i) * sum over square k of g_i * (replacement - x_i), with g_i the input gradient the
    penalty computes anyway (d p_y / dx = -p_y dCE/dx), so S costs no forward at all; p_y(x_i)
    cancels in the normalisation by the largest drop. It differs from the occlusion drops where the
    model is far from linear over one square (docs/regularizers.md#j-sigr), and with train-mode
    BatchNorm, where g_i = d(sum_j CE_j)/dx_i carries the terms through the batch statistics while
    an occlusion square is replaced in all B images at once.

    Args:
        lam_jacobian: weight of the Jacobian term, >= 0 (default 0.01, Hoffman et al.).
        lam_saliency: weight of the selective input-gradient term, >= 0 (default 0.1).
        patch: side of the squares, >= 1 (default 4).
        perturbation: "mean" or "blur".
        n_proj: random projections for the Jacobian estimate, >= 1.
        chunk: at most this many perturbed images per saliency forward, whole squares of B images
            (at least one square per forward: B images), an integer >= 1. Default None: 16 on CPU
            (one square per forward for batches of 16 or more), where small forwards keep the
            activations in cache and train-mode BatchNorm needs no per-square split (2x faster than
            one pass of all squares for a PreAct-ResNet-18 at 16x3x32x32), and 4096 on other
            devices, where large batches pay.
        saliency_estimate: "occlusion" (default: the perturbed forwards) or "linear" (their
            first-order estimate from the input gradient, no extra forward).
        generator: torch.Generator for the projections.
        backend: "auto" | "torch" | "triton" | "cuda", for the cross-entropy and the saliency
            term's norm reduction (``check_backend``).
    """

    def __init__(
        self,
        lam_jacobian: float = 0.01,
        lam_saliency: float = 0.1,
        patch: int = 4,
        perturbation: str = "mean",
        n_proj: int = 1,
        chunk: int | None = None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        saliency_estimate: str = "occlusion",
    ):
        self.lam_jacobian = check_float("lam_jacobian", lam_jacobian, min_value=0.0)
        self.lam_saliency = check_float("lam_saliency", lam_saliency, min_value=0.0)
        for name, value in (("patch", patch), ("chunk", chunk)):
            if name == "chunk" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                expected = "an integer >= 1 or None" if name == "chunk" else "an integer >= 1"
                raise ValueError(f"{name} must be {expected}, got {value!r}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if saliency_estimate not in SALIENCY_ESTIMATES:
            raise ValueError(f"saliency_estimate must be one of {SALIENCY_ESTIMATES}, got {saliency_estimate!r}")
        self.saliency_estimate = saliency_estimate
        self.patch, self.chunk, self.perturbation = patch, chunk, perturbation
        self.n_proj = check_int("n_proj", n_proj, 1)
        self.generator = generator
        self.backend = check_backend(backend, "JSIGRRegularizer")

    def __repr__(self):
        return (
            f"JSIGRRegularizer(lam_jacobian={self.lam_jacobian}, lam_saliency={self.lam_saliency}, "
            f"patch={self.patch}, perturbation={self.perturbation!r}, n_proj={self.n_proj}, "
            f"saliency_estimate={self.saliency_estimate!r})"
        )

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> Objective:
        x, y = Fn.check_inputs(model, x, y)
        model = eager_for_double_backward(model, "JSIGRRegularizer")
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images [B, C, H, W], got shape {tuple(x.shape)}")
        # Under DDP both penalties differentiate the wrapped module's output (Fn.forward_pair), and
        # the saliency forwards run on the unwrapped module (no communication)
        with twice_differentiable(self.backend):  # both penalties differentiate a backward
            logits, inner = Fn.forward_pair(model, x, y)
        ce = Fn.per_sample_cross_entropy(logits, y, self.backend)
        ce_inner = ce if inner is logits else Fn.per_sample_cross_entropy(inner, y, self.backend)
        # the occlusion forwards run before the input gradient's graph exists (its memory would be
        # held through all of them); the linear estimate is made from that gradient
        occlusion = self.saliency_estimate == "occlusion"
        saliency = self.saliency(unwrap(model), x.detach(), y, logits.detach()) if occlusion else None
        g = Fn.input_grad(ce_inner.sum(), x, create_graph=True)
        if not occlusion:
            saliency = self.linear_saliency(x.detach(), g.detach())
        r_s = Fn.gradient_norm_penalty(g * (1 - saliency), "l2", backend=self.backend)
        r_j = Fn.jacobian_penalty(inner, x, n_proj=self.n_proj, generator=self.generator)
        penalty = self.lam_jacobian * r_j + self.lam_saliency * r_s
        mean_ce = ce.mean()
        return Objective(mean_ce + penalty, mean_ce, penalty, logits)

    @torch.no_grad()
    def saliency(self, model, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """S(x) in [0, 1], shape [B, 1, H, W] (see the class docstring)."""
        model = unwrap(model)
        b, c, h, w = x.shape
        p = self.patch
        gh, gw = -(-h // p), -(-w // p)  # ceil: a partial square at the border is a square too
        if logits is None:
            with Fn.preserved_buffers(model):
                logits = model(x)
        # probabilities in float32 at least: half-precision softmax would blur small drops
        dtype = torch.promote_types(logits.dtype, torch.float32)
        p_clean = logits.to(dtype).softmax(1).gather(1, y[:, None])[:, 0]
        replacement = _replacement(x, self.perturbation)
        squares = [(r, q) for r in range(0, h, p) for q in range(0, w, p)]  # top-left corners
        chunk = self.chunk
        if chunk is None:
            chunk = DEFAULT_CHUNK_CPU if x.device.type == "cpu" else DEFAULT_CHUNK_ACCELERATOR
        per_chunk = max(1, chunk // b)
        drops = []
        with Fn.preserved_buffers(model):
            for k0 in range(0, len(squares), per_chunk):
                corners = squares[k0 : k0 + per_chunk]
                # copies of x with one square each replaced (assignment, not a mask product: exact)
                xp = x.repeat(len(corners), 1, 1, 1).view(len(corners), *x.shape)
                for j, (r, q) in enumerate(corners):
                    xp[j, :, :, r : r + p, q : q + p] = replacement[:, :, r : r + p, q : q + p]
                # each square's B perturbed images keep their own batch statistics (train-mode
                # BatchNorm), so S does not depend on how many squares share a forward (``chunk``)
                with Fn.per_replica_batch_norm(model, len(corners)):
                    p_pert = model(xp.flatten(0, 1)).to(dtype).softmax(1)
                p_pert = p_pert.gather(1, y.repeat(len(corners))[:, None]).view(len(corners), b)
                drops.append((p_clean - p_pert).clamp_min(0))
        return _square_map(torch.cat(drops).T, gh, gw, p, h, w).to(x.dtype)  # drops [B, K]

    @torch.no_grad()
    def linear_saliency(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """S(x) in [0, 1], shape [B, 1, H, W], from the first-order estimate of each square's drop in
        p_y (class docstring): a_ik = sum over square k and the channels of g * (replacement - x),
        normalised as the occlusion drops are. ``g`` is the input gradient of the per-sample
        cross-entropy, [B, C, H, W]."""
        if x.dim() != 4 or g.shape != x.shape:
            raise ValueError(
                f"x must be images [B, C, H, W] and g its input gradient of the same shape, got x of shape "
                f"{tuple(x.shape)} and g of shape {tuple(g.shape)}"
            )
        b, _, h, w = x.shape
        p = self.patch
        gh, gw = -(-h // p), -(-w // p)  # ceil: a partial square at the border is a square too
        dtype = torch.promote_types(x.dtype, torch.float32)  # sums of half-precision products lose too much
        change = (g.to(dtype) * (_replacement(x, self.perturbation) - x).to(dtype)).sum(1)  # [B, H, W]
        change = F.pad(change, (0, gw * p - w, 0, gh * p - h))  # zeros: no change outside the image
        drops = change.view(b, gh, p, gw, p).sum((2, 4)).flatten(1).clamp_min(0)  # [B, K]
        return _square_map(drops, gh, gw, p, h, w).to(x.dtype)


def _replacement(x: torch.Tensor, perturbation: str) -> torch.Tensor:
    """What a square is replaced by: the per-channel mean of the sample ("mean") or a 3x3 box
    blur of the image ("blur")."""
    if perturbation == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _square_map(drops: torch.Tensor, gh: int, gw: int, p: int, h: int, w: int) -> torch.Tensor:
    """[B, K] drops (K = gh x gw squares, row-major) -> S [B, 1, H, W]: each sample's drops divided by
    its largest (0 where no square lowers p_y), constant over each square."""
    top = drops.max(1, keepdim=True).values
    s = torch.where(top > 0, drops / top.clamp_min(torch.finfo(drops.dtype).tiny), torch.zeros_like(drops))
    return s.view(-1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)[..., :h, :w]
