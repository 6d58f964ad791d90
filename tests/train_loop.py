"""The mini-batch training loop the end-to-end tests share (digits models, plain or regularized)."""

import torch
import torch.nn.functional as F


def fit(
    model, x, y, objective=None, *, epochs: int, batch: int = 64, lr: float = 3e-3, check_finite: bool = False
) -> list:
    """Adam on (x, y) for ``epochs`` epochs of shuffled mini-batches (one torch.randperm per epoch,
    from the global RNG: seed it before building the model). ``objective(model, xb, yb) -> loss``
    (default: the cross-entropy of model(xb)). Returns the per-batch losses; ``check_finite``
    asserts each is finite. The model stays in the mode it was given."""
    opt = torch.optim.Adam(model.parameters(), lr)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(perm), batch):
            xb, yb = x[perm[i : i + batch]], y[perm[i : i + batch]]
            loss = F.cross_entropy(model(xb), yb) if objective is None else objective(model, xb, yb)
            assert not check_finite or torch.isfinite(loss), "the training loss is not finite"
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses
