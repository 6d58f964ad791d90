"""Small reference models: an MLP, a CNN with a CAM head, and PreAct-ResNet-18 (CIFAR shape),
each with a selectable activation ("relu", "softplus", "half_huber").

Why the activation matters: a ReLU network is piecewise linear, so gradient penalties cannot
smooth it (ReLU'' = 0 almost everywhere). Softplus and the half-Huber ReLU of Woods et al.
(2019; docs/methods.md#adversarial-explanations) have a second derivative that is non-zero where it matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastrob._checks import check_int
from fastrob.nn import BatchNorm2d, BiasAct

ACTIVATIONS = ("relu", "softplus", "half_huber")
MODELS = ("mlp", "cnn", "resnet18")


def activation(name: str) -> nn.Module:
    """A fresh activation module by name: "relu", "softplus" (beta = 1) or "half_huber" (d = 0.5),
    as a ``fastrob.nn.BiasAct``: the fused bias_act kernels (first and second derivative) on a GPU,
    the torch reference on CPU. The half-Huber ReLU (Woods et al. 2019) is 0 for x < 0, x²/(2d) on
    [0, d] and x − d/2 above: C¹, with the second derivative 1/d on [0, d] that double backprop needs."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return BiasAct(act=name)


class MLP(nn.Sequential):
    """Flatten -> [Linear -> act] * len(hidden) -> Linear(num_classes)."""

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        hidden: Sequence[int] = (128, 128),
        activation_name: str = "relu",
    ):
        num_classes = check_int("num_classes", num_classes, 2)
        d = 1
        for s in in_shape:
            d *= check_int("in_shape", s, 1)
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(d, check_int("hidden", width, 1)), activation(activation_name)]
            d = width
        layers.append(nn.Linear(d, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Three 3x3 convolutions with BatchNorm (``fastrob.nn.BatchNorm2d``), then a CAM head: global
    average pooling and one linear layer.

    With A(x) the last feature map (K channels) and W, b the head, the class activation map is
    I_c(x) = Σ_k W_{c,k} A_k(x) and the logit z_c = mean_{h,w} I_c(x) + b_c (Zhou et al. 2016;
    docs/methods.md#interpretation-aware-training), so ``cam(x)`` explains exactly what the head computes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, activation_name: str = "relu"):
        super().__init__()
        in_channels = check_int("in_channels", in_channels, 1)
        num_classes = check_int("num_classes", num_classes, 2)
        width = check_int("width", width, 1)
        # BatchNorm after each convolution: without it the GAP head trains very slowly (on digits
        # 16x16, 36% test accuracy after 4 epochs with ReLU and chance with softplus)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            BatchNorm2d(width),
            activation(activation_name),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False),
            BatchNorm2d(2 * width),
            activation(activation_name),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            BatchNorm2d(2 * width),
            activation(activation_name),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Class activation maps [B, C, H', W'] (without the bias): mean over space + b = logits."""
        return torch.einsum("ck,bkhw->bchw", self.head.weight, self.features(x))


class _PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, activation_name: str):
        super().__init__()
        self.bn1 = BatchNorm2d(in_planes)
        self.act1 = activation(activation_name)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.act2 = activation(activation_name)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = self.act1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 (He et al. 2016) in the CIFAR shape: a 3x3 stem, four stages of two
    pre-activation blocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2), BN-act, global average
    pooling, linear. Works on any input of at least 8x8 (adaptive pooling). Its BatchNorm layers are
    ``fastrob.nn.BatchNorm2d`` (state_dict keys as torch's)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, activation_name: str = "relu"):
        super().__init__()
        num_classes = check_int("num_classes", num_classes, 2)
        in_channels = check_int("in_channels", in_channels, 1)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        blocks, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for s in (stride, 1):
                blocks.append(_PreActBlock(in_planes, planes, s, activation_name))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = BatchNorm2d(512)
        self.act = activation(activation_name)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.act(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def build_model(name: str, in_shape: Sequence[int], num_classes: int, activation_name: str = "relu") -> nn.Module:
    """A model by name ("mlp" | "cnn" | "resnet18") for inputs of shape ``in_shape`` = (C, H, W)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if activation_name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation_name!r}")
    in_shape = tuple(in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"in_shape must be (C, H, W), got {in_shape}")
    if name == "mlp":
        return MLP(in_shape, num_classes, activation_name=activation_name)
    if name == "cnn":
        return SmallCNN(in_shape[0], num_classes, activation_name=activation_name)
    if min(in_shape[1:]) < 8:
        raise ValueError(f"resnet18 needs inputs of at least 8x8, got {in_shape[1]}x{in_shape[2]} (use --size 32)")
    return PreActResNet18(num_classes, in_shape[0], activation_name=activation_name)


class _ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x):
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attend(q, k, v).transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer in the layout of timm's: patch embedding (a strided conv), class
    token, learned position embedding, pre-norm blocks whose attention is
    ``F.scaled_dot_product_attention``, final LayerNorm, linear head on the class token.
    ``ViT(224, 16, dim=192, depth=12, heads=3)`` has ViT-Tiny's shape (197 tokens)."""

    def __init__(
        self,
        image_size: int = 32,
        patch: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        check_int("patch", patch, 1)
        if image_size % patch or dim % heads:
            raise ValueError(
                f"image_size must be a multiple of patch and dim of heads, got {image_size}, {patch}, {dim}, {heads}"
            )
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*(_ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
