"""The engine's step loop captured as one CUDA graph (fixed shapes, no early stop), replayed for
later calls of the same shapes. Objectives opt in by providing ``graph_key()`` (what the captured
graph depends on besides the shapes) and ``static_tensors()`` (the per-call tensors it reads, which
a replay overwrites in place)."""

from __future__ import annotations

import warnings

import torch

from fastrob.attacks.rows import Rows

_warned_graph = False


class GraphUnavailable(Exception):
    """Capture is not possible here; the engine runs the loop eagerly (after one warning)."""


def _unavailable(reason):
    global _warned_graph
    if not _warned_graph:
        _warned_graph = True
        warnings.warn(
            f"fastrob.attacks: cuda_graph=True falls back to eager execution: {reason}", RuntimeWarning, stacklevel=5
        )
    return GraphUnavailable(reason)


def run_captured(model, objective, rows, samples, steps, step, evaluate, cache):
    """Runs the ``steps`` steps of ``rows`` (the engine's rows) as one captured CUDA graph and
    returns the final iterate (``samples``: the rows' sample indices); raises GraphUnavailable
    (warning once per process) when it cannot. ``step(rows, grad)`` and ``evaluate(objective,
    model, x, samples, need_grad, where)`` are the engine's.

    The graph reads its inputs from static buffers, so a graph cached in ``cache`` (a dict owned
    by the caller, e.g. an attack object) is replayed after copying the new inputs in."""
    if rows.x_adv.device.type != "cuda":
        raise _unavailable("inputs are not on a CUDA device")
    if not (hasattr(objective, "graph_key") and hasattr(objective, "static_tensors")):
        raise _unavailable("the objective does not support capture (no graph_key/static_tensors)")
    if not torch.cuda.is_available():
        raise _unavailable("CUDA is not available")
    tensors = ("x_adv", "x0", "eps", "alpha")
    key = (
        tuple(rows.x_adv.shape),
        rows.x_adv.dtype,
        rows.x_adv.device,
        steps,
        tuple(v if not isinstance(v, torch.Tensor) else "tensor" for v in (rows.eps, rows.alpha)),
        objective.graph_key(),
    )
    entry = cache.get(key) if cache is not None else None
    try:
        if entry is None:
            static = Rows(
                **{
                    n: v.clone() if isinstance(v, torch.Tensor) else v
                    for n, v in ((n, getattr(rows, n)) for n in tensors)
                }
            )

            def loop(check):
                x_cur = static.x_adv
                for _ in range(steps):
                    _, grad = evaluate(
                        objective, model, x_cur, samples, True, where="at the start of the attack" if check else None
                    )
                    cur = Rows(x_adv=x_cur, x0=static.x0, eps=static.eps, alpha=static.alpha)
                    x_cur = step(cur, grad)
                return x_cur

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loop(True)  # warm-up: lazy initialisation and autotuning must not happen during capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = loop(False)
            entry = (graph, static, objective, result)
            if cache is not None:
                cache[key] = entry
    except GraphUnavailable:
        raise
    except Exception as err:  # capture is impossible for many models: run eagerly
        raise _unavailable(f"capture failed ({type(err).__name__}: {err})") from err
    graph, static, captured, result = entry
    for n in tensors:
        value = getattr(rows, n)
        if isinstance(value, torch.Tensor):
            getattr(static, n).copy_(value)
    for mine, new in zip(captured.static_tensors(), objective.static_tensors()):
        if mine is not new:
            mine.copy_(new)
    graph.replay()
    return result.clone()
