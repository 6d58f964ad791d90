"""J-SIGR's perturbation saliency against a plain loop over the squares (one forward of the whole
batch per square, the replacement written pixel by pixel), in eval mode and in train mode with
BatchNorm, for squares that do and do not divide the image, both perturbations and every way of
batching the squares (``chunk``)."""

import copy

import pytest
import torch
from test_functional import make_batch, make_model

from fastrob.regularizers import JSIGRRegularizer


def box_blur(image):
    """3x3 mean over the neighbours inside the image, pixel by pixel: [C, H, W]."""
    out = torch.empty_like(image)
    _, h, w = image.shape
    for u in range(h):
        for v in range(w):
            out[:, u, v] = image[:, max(0, u - 1) : u + 2, max(0, v - 1) : v + 2].mean(dim=(1, 2))
    return out


def square_map(drops, x, patch):
    """S [B, 1, H, W] from ``drops`` {(r, q): [B] drops of the square whose top-left corner is
    (r, q)}: each sample's drops divided by its largest (0 where no square lowers p_y), constant
    over each square, written square by square."""
    b, _, h, w = x.shape
    s = torch.zeros(b, 1, h, w, dtype=x.dtype)
    for i in range(b):
        top = max(float(d[i]) for d in drops.values())
        for (r, q), d in drops.items():
            s[i, 0, r : r + patch, q : q + patch] = float(d[i]) / top if top > 0 else 0.0
    return s


def loop_saliency(model, x, y, patch, perturbation):
    """S by the definition: for each square, one forward of the batch with that square replaced in
    every image; drops normalised per sample by the largest. Runs on a copy of the model, so that
    its train-mode forwards move no statistics of the model under test."""
    model = copy.deepcopy(model)
    b, _, h, w = x.shape
    rows = torch.arange(b)
    with torch.no_grad():
        p_clean = model(x).softmax(1)[rows, y]
        if perturbation == "mean":
            replacement = torch.stack([img.mean(dim=(1, 2))[:, None, None].expand_as(img) for img in x])
        else:
            replacement = torch.stack([box_blur(img) for img in x])
        drops = {}
        for r in range(0, h, patch):
            for q in range(0, w, patch):
                xp = x.clone()
                xp[:, :, r : r + patch, q : q + patch] = replacement[:, :, r : r + patch, q : q + patch]
                drops[r, q] = (p_clean - model(xp).softmax(1)[rows, y]).clamp(min=0)
    return square_map(drops, x, patch)


def buffers(model):
    return [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("chunk", [None, 4, 12, 4096], ids=["default", "one-square", "3-squares", "all"])
@pytest.mark.parametrize("perturbation", ["mean", "blur"])
@pytest.mark.parametrize("patch", [2, 4, 5], ids=["patch2", "patch4-partial", "patch5-partial"])
@pytest.mark.parametrize("train", [False, True], ids=["bn-eval", "bn-train"])
def test_saliency_equals_a_loop_over_squares(train, patch, perturbation, chunk):
    model = make_model("cnn", True, train)
    x, y = make_batch(batch=4)
    expected = loop_saliency(model, x, y, patch, perturbation)
    before = buffers(model)
    s = JSIGRRegularizer(patch=patch, perturbation=perturbation, chunk=chunk).saliency(model, x, y)
    torch.testing.assert_close(s, expected)
    assert 0 < expected.mean() < 1 and expected.amax() == 1  # the reference is not trivial
    for a, b in zip(before, buffers(model)):  # no running statistics moved
        assert torch.equal(a, b)
    assert model.training == train


def test_saliency_of_a_model_without_batch_norm():
    model = make_model("cnn", False, True)
    x, y = make_batch(batch=3)
    s = JSIGRRegularizer(patch=3).saliency(model, x, y)
    torch.testing.assert_close(s, loop_saliency(model, x, y, 3, "mean"))


def test_train_mode_saliency_differs_from_eval_mode():
    # the train-mode reference is a different function (batch statistics), so the test above can
    # tell a saliency computed in the wrong mode
    x, y = make_batch(batch=4)
    train = loop_saliency(make_model("cnn", True, True), x, y, 2, "mean")
    evaluated = loop_saliency(make_model("cnn", True, False), x, y, 2, "mean")
    assert (train - evaluated).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [0, -1, 2.0, True, "16"])
def test_chunk_must_be_a_positive_integer_or_none(chunk):
    with pytest.raises(ValueError, match="chunk must be an integer >= 1 or None"):
        JSIGRRegularizer(chunk=chunk)


@pytest.mark.parametrize("chunk", [4, 4096], ids=["one-square", "all"])
def test_train_mode_saliency_of_batch_norm_with_its_activation(chunk):
    """A BatchNorm module whose forward also runs an activation (timm's BatchNormAct2d, fastrob's
    fused BatchNormAct2d): batching squares normalises each square's images with their own
    statistics and keeps the activation."""
    from test_functional import _bn_act_models

    for name, model in _bn_act_models().items():
        model = torch.nn.Sequential(*model, torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).double().train()
        g = torch.Generator().manual_seed(2)
        x, y = torch.rand(4, 3, 6, 6, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
        s = JSIGRRegularizer(patch=2, chunk=chunk).saliency(model, x, y)
        torch.testing.assert_close(s, loop_saliency(model, x, y, 2, "mean"), msg=name)
