"""``fastxent bench --linear``: linear + cross-entropy from hidden states, beside the bare matmuls.

For each shape N x H x V (float32 hidden states (N, H), a head (V, H), N labels, mean
reduction) these entries are timed one after the other in this process
(:func:`.timing.time_cpu`):

* ``fastxent fwd`` / ``fastxent fwd+bwd``: ``fastxent.linear_cross_entropy`` (default
  ``memory``), forward only and with the three gradients;
* ``torch linear+CE`` and ``torch chunked`` (when PyTorch >= 2.13 is installed):
  ``F.cross_entropy(F.linear(h, W), y)`` and ``F.linear_cross_entropy(...,
  options=LinearCrossEntropyOptions())``, forward under ``no_grad`` and forward +
  ``backward()``;
* the yardstick, the bare products of the same shapes with numpy into preallocated
  outputs: ``h @ W.T`` (a forward's), ``G @ W`` and ``G.T @ h`` (a backward's).

Forward entries are compared with the first product, forward+backward ones with the
three. fastxent's result is checked against a float64 computation: the mean loss over
every row and the gradient of the first rows of ``hidden``. ``bench/bench_linear.py``
builds on the same entries and adds the peak memory of each.
"""

import numpy as np

import fastxent as fx

from .timing import time_cpu

#: ``--linear default``: the issue's shapes, an LLM head at 32000 and at 128256 classes.
DEFAULT_SHAPES = ((2048, 1024, 32000), (512, 1024, 128256))
QUICK_SHAPES = ((128, 32, 1000),)
#: Rows of hidden whose gradient is checked against float64.
CHECKED_ROWS = 16
#: Rows per block of the float64 check (its work arrays: 8 * V bytes a row).
CHECK_BLOCK = 256


def parse_shapes(text):
    """``"2048x1024x32000,..."`` or ``"default"`` -> ``[(N, H, V), ...]``; ValueError with the reason."""
    if text.strip() == "default":
        return list(DEFAULT_SHAPES)
    shapes = []
    for part in text.split(","):
        part = part.strip().lower().replace("×", "x")
        try:
            dims = tuple(int(d.replace("_", "")) for d in part.split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) < 1 or dims[2] < 2:
            raise ValueError(f"--linear: {part!r} is not NxHxV (rows x features x classes, V >= 2), "
                             "e.g. 2048x1024x32000, or 'default'")
        shapes.append(dims)
    return shapes


def make_data(n, h, v, seed=0):
    """float32 hidden states, a head scaled so the logits spread over a few units, labels."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, h), dtype=np.float32)
    weight = rng.standard_normal((v, h), dtype=np.float32) * np.float32(2 / np.sqrt(h))
    return hidden, weight, rng.integers(0, v, n)


def _fastxent(hidden, weight, labels, memory=None):
    def forward():
        return fx.linear_cross_entropy(hidden, weight, labels, reduction="mean", memory=memory), ()

    def both():
        loss, grad = fx.linear_cross_entropy(hidden, weight, labels, reduction="mean", return_grad=True,
                                             memory=memory)
        return loss, (grad.hidden, grad.weight)
    return forward, both


def _torch(hidden, weight, labels, chunked):
    import torch
    import torch.nn.functional as F

    h = torch.from_numpy(hidden).requires_grad_(True)
    w = torch.from_numpy(weight).requires_grad_(True)
    y = torch.from_numpy(labels)
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None

    def loss_of():
        if chunked:
            return F.linear_cross_entropy(h, w, y, options=options)
        return F.cross_entropy(F.linear(h, w), y)

    def forward():
        with torch.no_grad():
            return float(loss_of()), ()

    def both():
        h.grad = w.grad = None
        loss = loss_of()
        loss.backward()
        return float(loss.detach()), (h.grad.numpy(), w.grad.numpy())
    return forward, both


def _torch_has_linear_cross_entropy():
    try:
        import torch
    except ImportError:
        return False
    return hasattr(torch.nn.functional, "linear_cross_entropy")


def entries(hidden, weight, labels, blocks=()):
    """name -> call returning ``(loss, gradients (hidden, weight) or ())``; the matmuls return ``(None, ())``.

    ``blocks``: extra ``fastxent fwd+bwd memory=M`` entries at those budgets.
    """
    makers = [("fastxent", _fastxent(hidden, weight, labels))]
    if _torch_has_linear_cross_entropy():
        makers += [("torch linear+CE", _torch(hidden, weight, labels, chunked=False)),
                   ("torch chunked", _torch(hidden, weight, labels, chunked=True))]
    calls = {}
    for name, (forward, both) in makers:
        calls[f"{name} fwd"], calls[f"{name} fwd+bwd"] = forward, both
    for memory in blocks:
        calls[f"fastxent fwd+bwd memory={memory}"] = _fastxent(hidden, weight, labels, memory)[1]
    grad = np.empty((hidden.shape[0], weight.shape[0]), np.float32)
    out_hidden, out_weight = np.empty_like(hidden), np.empty_like(weight)
    calls["matmul h@W.T"] = _product(hidden, weight.T, grad)
    calls["matmul G@W"] = _product(grad, weight, out_hidden)
    calls["matmul G.T@h"] = _product(grad.T, hidden, out_weight)
    return calls


def _product(a, b, out):
    def run():
        np.matmul(a, b, out=out)
        return None, ()
    return run


def check(result, hidden, weight, labels):
    """None if ``(loss, (grad_hidden, ...))`` agrees with float64, else what differs."""
    loss, grads = result
    n = hidden.shape[0]
    w64 = weight.astype(np.float64)
    total = 0.0
    for start in range(0, n, CHECK_BLOCK):
        logits = hidden[start:start + CHECK_BLOCK].astype(np.float64) @ w64.T
        peak = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        total += float((lse - logits[np.arange(len(logits)), labels[start:start + CHECK_BLOCK]]).sum())
        if start == 0 and grads:
            rows = min(CHECKED_ROWS, n)
            probs = np.exp(logits[:rows] - lse[:rows, None])
            probs[np.arange(rows), labels[:rows]] -= 1
            expected = probs @ w64 / n
            error = np.abs(np.asarray(grads[0][:rows], np.float64) - expected).max()
            if error > 1e-4 * np.abs(expected).max() + 1e-9:
                return f"grad of hidden off by {error:.3g} (largest {np.abs(expected).max():.3g})"
    if not np.isclose(float(loss), total / n, rtol=2e-5, atol=2e-5):
        return f"loss {float(loss):.7g} != {total / n:.7g}"
    return None


def run(shapes, repeat=None, blocks=(), log=None):
    """``{shape: {entry: (median seconds, verdict or None)}}`` for each N x H x V of ``shapes``."""
    results = {}
    for shape in shapes:
        data = make_data(*shape)
        results[shape] = {}
        for name, call in entries(*data, blocks=blocks).items():
            inspect = None if name.startswith("matmul") else (lambda result: check(result, *data))
            verdict, times = time_cpu(call, repeat, inspect=inspect)
            results[shape][name] = (float(np.median(times)), verdict)
            if verdict and log:
                log(f"{name} disagrees with float64 at {'x'.join(map(str, shape))}: {verdict}")
    return results


def table(results):
    """Markdown: per shape, each entry's median, its ratio to the bare matmuls and fastxent's speed-up."""
    lines = []
    for (n, h, v), timing in results.items():
        forward = timing["matmul h@W.T"][0]
        three = forward + timing["matmul G@W"][0] + timing["matmul G.T@h"][0]
        lines += [f"linear + cross-entropy, N={n} H={h} V={v}, float32: bare matmuls {forward * 1e3:.0f} ms "
                  f"(forward), {three * 1e3:.0f} ms (all three)", "",
                  "| entry | median | / bare matmuls | fastxent speed-up | agrees |", "|---|---|---|---|---|"]
        for name, (seconds, verdict) in timing.items():
            if name.startswith("matmul"):
                lines.append(f"| {name} | {seconds * 1e3:.0f} ms | | | |")
                continue
            kind = "fwd+bwd" if "fwd+bwd" in name else "fwd"
            ratio = seconds / (three if kind == "fwd+bwd" else forward)
            speedup = "" if name.startswith("fastxent") else f"{seconds / timing[f'fastxent {kind}'][0]:.2f}×"
            lines.append(f"| {name} | {seconds * 1e3:.0f} ms | {ratio:.2f}× | {speedup} | "
                         f"{'✗ ' + verdict if verdict else '✓'} |")
        lines.append("")
    return "\n".join(lines)
