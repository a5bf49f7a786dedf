"""fastxent.torch against torch's own functions: values, gradients, dtypes, autograd, compile.

The reference is torch itself: ``F.cross_entropy`` / ``F.binary_cross_entropy_with_logits``
run in float64 on the same (upcast) inputs, so a 16-bit result is compared with
the exact value rounded once. Every case checks the loss and the gradient for a
random incoming gradient, and for reduced losses the incoming gradient 1 (the
saved gradient handed over as is) and 0.7 (one multiply).
"""

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastxent as fx  # noqa: E402
import fastxent.torch as fxt  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "float64", "bfloat16", "float16"]

#: (rtol, atol) per dtype for the loss and the gradient against torch in float64.
#: 16-bit results are the float32-accumulated value rounded once to the dtype.
TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (2e-3, 1e-5),
}

REDUCTIONS = ["none", "sum", "mean"]


def _backend_runs(call):
    """True when the default backend implements ``call`` (the Numba sigmoid family lands later)."""
    try:
        call()
    except (AttributeError, NotImplementedError):
        return False
    return True


@pytest.fixture
def sigmoid_backend(monkeypatch):
    """The default backend, or the float64 reference where the Numba kernel does not exist yet.

    Set through the environment (read at each call) so autograd and worker
    threads see it too.
    """
    zeros = np.zeros((2, 3), np.float32)
    if not _backend_runs(lambda: fx.sigmoid_cross_entropy(zeros, zeros, return_grad=True)):
        monkeypatch.setenv("FASTXENT_BACKEND", "numpy")


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double()
    e = expected.detach().double()
    ok = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True) | (a == e)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:8].tolist()
        lines = [f"{what}: {int((~ok).sum())} of {ok.numel()} differ (rtol={rtol}, atol={atol})"]
        lines += [f"  at {tuple(i)}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}" for i in bad]
        pytest.fail("\n".join(lines))


def _logits(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    spikes = torch.rand(shape, generator=g) < 0.05
    x = torch.where(spikes, x * 6, x)
    return x.to(dtype)


def _incoming(loss, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype) + 0.5


def _compare(ours, theirs, x, dtype, kwargs, what):
    """Loss and gradient of ``ours(x)`` against ``theirs(x in float64)``, for several incoming gradients."""
    xa = x.detach().clone().requires_grad_(True)
    xb = x.detach().double().requires_grad_(True)
    la = ours(xa, **kwargs)
    lb = theirs(xb, **kwargs)
    assert la.dtype == dtype, f"{what}: loss dtype {la.dtype}"
    assert_close(la, lb, dtype, f"{what} loss")
    incoming = [_incoming(la)] if la.dim() else [torch.tensor(1.0, dtype=dtype), torch.tensor(0.7, dtype=dtype)]
    for g in incoming:
        (ga,) = torch.autograd.grad(la, xa, grad_outputs=g, retain_graph=True)
        (gb,) = torch.autograd.grad(lb, xb, grad_outputs=g.double(), retain_graph=True)
        assert ga.dtype == dtype
        assert_close(ga, gb, dtype, f"{what} grad (incoming {g.flatten()[:1].item():.3g}...)")


# ----------------------------------------------------------------------------
# cross_entropy: class indices
# ----------------------------------------------------------------------------

SHAPES = {"rank1": (7,), "rank2": (6, 5), "rank3": (3, 4, 5), "rank4": (2, 3, 4, 3)}
INDEX_OPTIONS = {
    "plain": {},
    "weight": {"weight": "random"},
    "ignore": {"ignore_index": -100},
    "ignore_class": {"ignore_index": 1},
    "smoothing": {"label_smoothing": 0.15},
    "all": {"weight": "random", "ignore_index": -100, "label_smoothing": 0.1},
    "signed_weight": {"weight": "signed", "ignore_index": -100, "label_smoothing": 0.1},
}


def _targets(shape, count, ignore_index=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    target_shape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    target = torch.randint(0, count, target_shape, generator=g)
    if ignore_index is not None and target.dim():
        drop = torch.rand(target_shape, generator=g) < 0.3
        drop.view(-1)[0] = False  # at least one counted row
        drop.view(-1)[-1] = True  # at least one ignored row
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
    return target


def _index_kwargs(option, count, reduction):
    kwargs = dict(INDEX_OPTIONS[option], reduction=reduction)
    if kwargs.get("weight") == "random":
        kwargs["weight"] = torch.rand(count, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.2
    if kwargs.get("weight") == "signed":  # torch accepts any real weights; these sum far from 0
        kwargs["weight"] = torch.linspace(-1.0, 2.0, count, dtype=torch.float64) ** 3 + 0.5
    return kwargs


def _torch_reference(kwargs):
    def run(x, target, **kw):
        kw = dict(kw)
        if kw.get("weight") is not None:
            kw["weight"] = kw["weight"].double()
        if target.is_floating_point():
            target = target.double()
        return F.cross_entropy(x, target, **kw)
    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("rank", list(SHAPES))
@pytest.mark.parametrize("option", list(INDEX_OPTIONS))
def test_cross_entropy_class_indices(dtype, reduction, rank, option):
    shape = SHAPES[rank]
    count = shape[1] if len(shape) >= 2 else shape[0]
    kwargs = _index_kwargs(option, count, reduction)
    ignore = kwargs.get("ignore_index")
    target = _targets(shape, count, ignore if ignore is not None and ignore < 0 else None)
    if kwargs.get("weight") is not None:
        kwargs["weight"] = kwargs["weight"].to(dtype)
    x = _logits(shape, dtype)
    _compare(lambda xx, **kw: fxt.cross_entropy(xx, target, **kw),
             lambda xx, **kw: _torch_reference(kw)(xx, target, **kw),
             x, dtype, kwargs, f"{rank} {option} {reduction}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("rank", list(SHAPES))
@pytest.mark.parametrize("option", ["plain", "weight", "smoothing", "weight_smoothing"])
def test_cross_entropy_probabilities(dtype, reduction, rank, option):
    shape = SHAPES[rank]
    class_dim = 1 if len(shape) >= 2 else 0
    count = shape[class_dim]
    g = torch.Generator().manual_seed(2)
    target = torch.rand(shape, generator=g, dtype=torch.float64)
    target = torch.where(torch.rand(shape, generator=g) < 0.3, 0.0, target)
    target = (target / target.sum(class_dim, keepdim=True).clamp_min(1e-9)).to(dtype)
    kwargs = {"reduction": reduction}
    if "weight" in option:
        kwargs["weight"] = (torch.rand(count, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    if "smoothing" in option:
        kwargs["label_smoothing"] = 0.2
    x = _logits(shape, dtype)
    _compare(lambda xx, **kw: fxt.cross_entropy(xx, target, **kw),
             lambda xx, **kw: _torch_reference(kw)(xx, target, **kw),
             x, dtype, kwargs, f"{rank} probabilities {option} {reduction}")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weight", [None, "zeros", "signed_zero_sum"])
def test_mean_over_a_zero_denominator_is_torchs(label_smoothing, weight):
    # torch divides by the zero sum of weights: NaN, or +-inf when the weighted
    # sum is not zero (signed weights); the gradient is torch's too.
    x = _logits((4, 3), torch.float64).requires_grad_(True)
    if weight is None:
        target, w = torch.full((4,), -100), None
    elif weight == "zeros":  # counted rows, all of class weight 0
        target, w = torch.tensor([0, 0, 1, -100]), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    else:
        target, w = torch.tensor([0, 1, 2, -100]), torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64)
    ours = fxt.cross_entropy(x, target, weight=w, label_smoothing=label_smoothing)
    theirs = F.cross_entropy(x, target, weight=w, label_smoothing=label_smoothing)
    assert not math.isfinite(theirs.item())
    assert_close(ours, theirs, torch.float64, "loss")
    (ga,) = torch.autograd.grad(ours, x)
    (gb,) = torch.autograd.grad(theirs, x)
    assert_close(ga, gb, torch.float64, "grad")
    with torch.no_grad():
        assert_close(fxt.cross_entropy(x, target, weight=w, label_smoothing=label_smoothing), theirs,
                     torch.float64, "forward only")


@pytest.mark.parametrize("probabilities", [False, True])
def test_empty_batch_mean_is_nan(probabilities):
    x = torch.zeros((0, 5), requires_grad=True)
    target = torch.zeros((0, 5)) if probabilities else torch.zeros((0,), dtype=torch.long)
    loss = fxt.cross_entropy(x, target)
    assert math.isnan(loss.item()) and math.isnan(F.cross_entropy(x, target).item())
    loss.backward()
    assert x.grad.shape == (0, 5)
    assert fxt.cross_entropy(x, target, reduction="sum").item() == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target", ["ignored", "probabilities", "unbatched_probabilities"])
def test_zero_classes_give_torchs_result(reduction, target):
    shape = (0,) if target.startswith("unbatched") else (3, 0)
    x = torch.zeros(shape, requires_grad=True)
    y = torch.full((3,), -100) if target == "ignored" else torch.zeros(shape)
    ours = fxt.cross_entropy(x, y, reduction=reduction)
    theirs = F.cross_entropy(x, y, reduction=reduction)
    assert_close(ours, theirs, torch.float32, "loss")
    assert torch.autograd.grad(ours.sum(), x)[0].shape == shape
    with pytest.raises(IndexError, match="out of bounds"):  # torch's own error: no class to point at
        fxt.cross_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))


def test_z_loss_and_softcap_against_a_torch_formula():
    x = _logits((6, 9), torch.float64).requires_grad_(True)
    target = torch.tensor([0, 3, -100, 8, 2, 2])
    weight = torch.rand(9, dtype=torch.float64) + 0.5
    kwargs = dict(weight=weight, label_smoothing=0.1, reduction="none")

    def formula(xx):
        capped = 4.0 * torch.tanh(xx / 4.0)
        lse = torch.logsumexp(capped, 1)
        return F.cross_entropy(capped, target, **kwargs) + 1e-2 * lse**2 * (target != -100)

    ours = fxt.cross_entropy(x, target, z_loss=1e-2, softcap=4.0, **kwargs)
    theirs = formula(x)
    assert_close(ours, theirs, torch.float64, "z_loss+softcap loss")
    g = _incoming(ours)
    assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0],
                 torch.float64, "z_loss+softcap grad")


def test_legacy_size_average_and_reduce_map_like_torch():
    x = _logits((5, 4), torch.float32)
    target = torch.tensor([0, 1, 2, 3, 0])
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            ours = fxt.cross_entropy(x, target, size_average=size_average, reduce=reduce)
            theirs = F.cross_entropy(x, target, size_average=size_average, reduce=reduce)
        assert_close(ours, theirs, torch.float32, f"size_average={size_average} reduce={reduce}")


def test_target_requiring_grad_falls_back_to_torch():
    x = _logits((4, 3), torch.float64).requires_grad_(True)
    target = torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1).requires_grad_(True)
    ours = fxt.cross_entropy(x, target)
    theirs = F.cross_entropy(x, target)
    assert_close(ours, theirs, torch.float64, "loss")
    ga = torch.autograd.grad(ours, (x, target))
    gb = torch.autograd.grad(theirs, (x, target))
    for a, b in zip(ga, gb):
        assert_close(a, b, torch.float64, "grad")


def test_no_grad_runs_forward_only():
    x = _logits((4, 3), torch.float32).requires_grad_(True)
    with torch.no_grad():
        loss = fxt.cross_entropy(x, torch.tensor([0, 1, 2, 0]))
    assert loss.grad_fn is None and not loss.requires_grad
    loss = fxt.cross_entropy(x.detach(), torch.tensor([0, 1, 2, 0]))
    assert loss.grad_fn is None


def test_bad_input_errors_name_the_problem():
    x = _logits((4, 3), torch.float32)
    with pytest.raises(ValueError, match="outside"):
        fxt.cross_entropy(x, torch.tensor([0, 1, 5, 0]))
    with pytest.raises(TypeError, match="integer"):
        fxt.cross_entropy(x, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(TypeError, match="floating point"):
        fxt.cross_entropy(x, torch.zeros((4, 3), dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        fxt.cross_entropy(x, torch.tensor([0, 1, 2, 0]), reduction="avg")
    with pytest.raises(ValueError, match="binary"):
        fxt.cross_entropy(_logits((4, 1), torch.float32), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="z_loss"):
        fxt.cross_entropy(x, torch.softmax(x, 1), z_loss=0.1)
    with pytest.raises(ValueError, match="ignore_index is not supported for floating point target"):
        fxt.cross_entropy(x, torch.softmax(x, 1), ignore_index=1)
    with pytest.raises(TypeError, match="device"):
        fxt.cross_entropy(torch.zeros((2, 3), device="meta"), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------
# binary_cross_entropy_with_logits
# ----------------------------------------------------------------------------

BCE_SHAPES = {"rank1": (7,), "rank2": (6, 5), "rank3": (3, 4, 5)}
BCE_OPTIONS = ["plain", "weight_class", "weight_full", "pos_weight_scalar", "pos_weight_class", "both"]


def _bce_kwargs(option, shape, dtype, reduction):
    g = torch.Generator().manual_seed(11)
    kwargs = {"reduction": reduction}
    last = shape[-1]
    if option in ("weight_class", "both"):
        kwargs["weight"] = (torch.rand(last, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    if option == "weight_full":
        kwargs["weight"] = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    if option == "pos_weight_scalar":
        kwargs["pos_weight"] = torch.tensor(2.5, dtype=dtype)
    if option in ("pos_weight_class", "both"):
        kwargs["pos_weight"] = (torch.rand(last, generator=g, dtype=torch.float64) * 3 + 0.1).to(dtype)
    return kwargs


def _bce_reference(target):
    def run(x, **kw):
        kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        return F.binary_cross_entropy_with_logits(x, target.double(), **kw)
    return run


@pytest.mark.usefixtures("sigmoid_backend")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("rank", list(BCE_SHAPES))
@pytest.mark.parametrize("option", BCE_OPTIONS)
def test_bce_with_logits(dtype, reduction, rank, option):
    shape = BCE_SHAPES[rank]
    g = torch.Generator().manual_seed(4)
    target = torch.rand(shape, generator=g, dtype=torch.float64)
    target = torch.where(torch.rand(shape, generator=g) < 0.5, target.round(), target).to(dtype)
    kwargs = _bce_kwargs(option, shape, dtype, reduction)
    _compare(lambda xx, **kw: fxt.binary_cross_entropy_with_logits(xx, target, **kw),
             _bce_reference(target), _logits(shape, dtype), dtype, kwargs, f"{rank} {option} {reduction}")


@pytest.mark.usefixtures("sigmoid_backend")
def test_bce_edge_cases_like_torch():
    x = torch.zeros((0, 3), requires_grad=True)
    loss = fxt.binary_cross_entropy_with_logits(x, torch.zeros((0, 3)))
    assert math.isnan(loss.item()) and math.isnan(F.binary_cross_entropy_with_logits(x, torch.zeros((0, 3))).item())
    with pytest.raises(ValueError, match="Target size"):
        fxt.binary_cross_entropy_with_logits(torch.zeros(3, 2), torch.zeros(3))
    big = torch.tensor([-200.0, 200.0, 0.0], dtype=torch.float64)
    z = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    assert_close(fxt.binary_cross_entropy_with_logits(big, z, reduction="none"),
                 F.binary_cross_entropy_with_logits(big, z, reduction="none"), torch.float64, "saturated")
    xs = torch.randn(2, 3, requires_grad=True)
    zs = torch.rand(2, 3, requires_grad=True)
    ours = fxt.binary_cross_entropy_with_logits(xs, zs)
    theirs = F.binary_cross_entropy_with_logits(xs, zs)
    for a, b in zip(torch.autograd.grad(ours, (xs, zs)), torch.autograd.grad(theirs, (xs, zs))):
        assert_close(a, b, torch.float32, "target requiring grad (torch fallback)")
    with pytest.raises(RuntimeError, match="not differentiable"):  # torch's own error
        fxt.binary_cross_entropy_with_logits(xs, torch.ones(2, 3), weight=torch.rand(3, requires_grad=True))


# ----------------------------------------------------------------------------
# autograd: gradcheck, forward mode, second order, torch.func
# ----------------------------------------------------------------------------

#: One float64 case per option family: (loss, options), for gradcheck, gradgradcheck
#: and the torch.func transforms. Weights of both signs, as torch allows.
AUTOGRAD_CASES = {
    "indices": ("ce", {}),
    "indices_weight_smoothing_ignore": ("ce", {"weight": "signed", "label_smoothing": 0.2, "ignore": True}),
    "indices_z_loss": ("ce", {"weight": "signed", "z_loss": 0.05, "ignore": True}),
    "indices_softcap": ("ce", {"softcap": 2.5, "z_loss": 0.05, "label_smoothing": 0.1, "weight": "signed"}),
    "rank4": ("ce", {"rank4": True}),
    "unbatched": ("ce", {"unbatched": True}),
    "probabilities_weight_smoothing": ("ce", {"probabilities": True, "weight": "signed", "label_smoothing": 0.1}),
    "probabilities_softcap": ("ce", {"probabilities": True, "softcap": 3.0}),
    "bce": ("bce", {}),
    "bce_weights": ("bce", {"weight": "signed", "pos_weight": True}),
}


def _autograd_case(case, reduction, seed=0):
    """``(loss_fn, theirs_or_None, x)``: ours, torch's function where torch has the options, float64 logits."""
    kind, opts = AUTOGRAD_CASES[case]
    g = torch.Generator().manual_seed(seed)
    if kind == "bce":
        x = torch.randn(4, 3, generator=g, dtype=torch.float64)
        z = torch.rand(4, 3, generator=g, dtype=torch.float64)
        kw = {"reduction": reduction}
        if opts.get("weight"):
            kw["weight"] = torch.rand(3, generator=g, dtype=torch.float64) * 2 - 0.5
        if opts.get("pos_weight"):
            kw["pos_weight"] = torch.rand(3, generator=g, dtype=torch.float64) * 3
        return (lambda xx: fxt.binary_cross_entropy_with_logits(xx, z, **kw),
                lambda xx: F.binary_cross_entropy_with_logits(xx, z, **kw), x)
    shape = (2, 4, 3, 2) if opts.get("rank4") else (4,) if opts.get("unbatched") else (5, 4)
    class_dim = 0 if len(shape) == 1 else 1
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if opts.get("probabilities"):
        target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), class_dim)
    else:
        target = torch.randint(0, 4, shape[:class_dim] + shape[class_dim + 1:], generator=g)
        if opts.get("ignore"):
            target[1] = -100
    kw = {"reduction": reduction}
    if opts.get("weight"):
        kw["weight"] = torch.tensor([1.5, -0.5, 0.75, 2.0], dtype=torch.float64)
    if "label_smoothing" in opts:
        kw["label_smoothing"] = opts["label_smoothing"]
    extras = {k: opts[k] for k in ("z_loss", "softcap") if k in opts}
    theirs = None if extras else (lambda xx: F.cross_entropy(xx, target, **kw))
    return lambda xx: fxt.cross_entropy(xx, target, **kw, **extras), theirs, x


@pytest.mark.usefixtures("sigmoid_backend")
@pytest.mark.parametrize("case", list(AUTOGRAD_CASES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck_float64(case, reduction):
    fn, _, x = _autograd_case(case, reduction)
    x.requires_grad_(True)
    # Full Jacobians for first order; for second order, gradgradcheck's fast mode
    # (random projections of the Jacobians, about half the time here) except for
    # one case per loss, checked in full.
    full = reduction == "mean" and case in ("indices_weight_smoothing_ignore", "bce_weights")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5, check_batched_grad=True,
                                    check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5, check_batched_grad=True,
                                        check_fwd_over_rev=True, fast_mode=not full)


def _hvp_by_kernel(x, v, class_dim):
    """``fastxent.softmax_cross_entropy_hvp`` of each row: the kernel the Hessians are held to."""
    return torch.from_numpy(fx.softmax_cross_entropy_hvp(x.detach().numpy(), v.numpy(), axis=class_dim))


@pytest.mark.usefixtures("sigmoid_backend")
def test_hessians_match_the_second_order_kernels():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (6,), generator=g)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    for reduction, scale in (("sum", 1.0), ("mean", 1.0 / 6)):
        loss_of = lambda xx: fxt.cross_entropy(xx, target, reduction=reduction)  # noqa: E731
        _, hvp = torch.autograd.functional.hvp(loss_of, x, v)
        assert_close(hvp, scale * _hvp_by_kernel(x, v, 1), torch.float64, f"{reduction} hvp vs kernel")
    soft = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), 1)
    _, hvp = torch.autograd.functional.hvp(lambda xx: fxt.cross_entropy(xx, soft, reduction="sum"), x, v)
    assert_close(hvp, _hvp_by_kernel(x, v, 1), torch.float64, "soft labels hvp vs kernel")
    z = torch.rand(6, 5, generator=g, dtype=torch.float64)
    q = torch.rand(5, generator=g, dtype=torch.float64) * 3
    hessian = torch.autograd.functional.hessian(
        lambda xx: fxt.binary_cross_entropy_with_logits(xx, z, pos_weight=q, reduction="sum"), x)
    diagonal = torch.from_numpy(fx.sigmoid_cross_entropy_hessian_diag(x.numpy(), z.numpy(), pos_weight=q.numpy()))
    assert_close(hessian.reshape(30, 30), torch.diag(diagonal.reshape(-1)), torch.float64, "bce hessian vs kernel")


@pytest.mark.usefixtures("sigmoid_backend")
@pytest.mark.parametrize("case", [c for c, (_, o) in AUTOGRAD_CASES.items() if not {"z_loss", "softcap"} & set(o)])
def test_torch_func_transforms_match_torch(case):
    """vmap, grad, jvp, jacrev, jacfwd and hessian of ours against the same transforms of torch's."""
    ours, theirs, x = _autograd_case(case, "mean")
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    func = torch.func
    for name, transform in [("grad", func.grad), ("jacrev", func.jacrev), ("jacfwd", func.jacfwd),
                            ("hessian", func.hessian)]:
        assert_close(transform(ours)(x), transform(theirs)(x), torch.float64, f"{case} {name}")
    assert_close(func.jvp(ours, (x,), (tangent,))[1], func.jvp(theirs, (x,), (tangent,))[1], torch.float64,
                 f"{case} jvp")
    batch = torch.stack([x, 2 * x, -x])
    assert_close(func.vmap(ours)(batch), func.vmap(theirs)(batch), torch.float64, f"{case} vmap")
    assert_close(func.vmap(func.grad(ours))(batch), func.vmap(func.grad(theirs))(batch), torch.float64,
                 f"{case} vmap(grad)")


@pytest.mark.usefixtures("sigmoid_backend")
@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_forward_ad_gives_the_tangent(loss):
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    tangent = torch.randn(5, 4, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        target = torch.randint(0, 4, (5,), generator=g)
        ours, theirs = fxt.cross_entropy, F.cross_entropy
    else:
        target = torch.rand(5, 4, generator=g, dtype=torch.float64)
        ours, theirs = fxt.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
    for reduction in REDUCTIONS:
        with fwAD.dual_level():
            a = fwAD.unpack_dual(ours(fwAD.make_dual(x, tangent), target, reduction=reduction))
            b = fwAD.unpack_dual(theirs(fwAD.make_dual(x, tangent), target, reduction=reduction))
        assert a.tangent is not None, f"{loss} {reduction}: no tangent"
        assert_close(a.primal, b.primal, torch.float64, f"{loss} {reduction} primal")
        assert_close(a.tangent, b.tangent, torch.float64, f"{loss} {reduction} tangent")


@pytest.mark.usefixtures("sigmoid_backend")
@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_gradient_penalty_and_third_order_match_torch(loss):
    # A gradient penalty through a model: the second-order terms of the loss
    # reach the model's weights; and one more derivative for good measure.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    if loss == "cross_entropy":
        target = torch.tensor([0, 1, 2, 0])
        ours = lambda out: fxt.cross_entropy(out, target, label_smoothing=0.1)  # noqa: E731
        theirs = lambda out: F.cross_entropy(out, target, label_smoothing=0.1)  # noqa: E731
    else:
        target = torch.rand(4, 3, dtype=torch.float64)
        ours = lambda out: fxt.binary_cross_entropy_with_logits(out, target)  # noqa: E731
        theirs = lambda out: F.binary_cross_entropy_with_logits(out, target)  # noqa: E731

    def penalty(fn):
        (grad,) = torch.autograd.grad(fn(model(x)), x, create_graph=True)
        return torch.autograd.grad((grad ** 2).sum(), [x, *model.parameters()], create_graph=True)

    for a, b in zip(penalty(ours), penalty(theirs)):
        assert_close(a, b, torch.float64, f"{loss} gradient penalty")
    third_ours = torch.autograd.grad(penalty(ours)[0].sum(), x)[0]
    third_theirs = torch.autograd.grad(penalty(theirs)[0].sum(), x)[0]
    assert_close(third_ours, third_theirs, torch.float64, f"{loss} third order")


def test_derivatives_for_target_are_torchs():
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    soft = torch.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), 1)
    z = torch.rand(3, 4, generator=g, dtype=torch.float64)
    tangent = torch.randn(3, 4, generator=g, dtype=torch.float64)
    with fwAD.dual_level():  # a dual target goes to torch's function
        a = fwAD.unpack_dual(fxt.cross_entropy(x, fwAD.make_dual(soft, tangent))).tangent
        b = fwAD.unpack_dual(F.cross_entropy(x, fwAD.make_dual(soft, tangent))).tangent
    assert_close(a, b, torch.float64, "target tangent")
    for ours, theirs, y in [(fxt.cross_entropy, F.cross_entropy, soft),
                            (fxt.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, z)]:
        for transform in (torch.func.grad, torch.func.jacfwd):
            assert_close(transform(lambda yy: ours(x, yy))(y), transform(lambda yy: theirs(x, yy))(y),
                         torch.float64, f"{ours.__name__} {transform.__name__} in target")


# ----------------------------------------------------------------------------
# modules, zero copy, strides, compile
# ----------------------------------------------------------------------------

def test_backward_twice_with_retain_graph_is_stable():
    x = _logits((4, 3), torch.float32).requires_grad_(True)
    loss = fxt.cross_entropy(x, torch.tensor([0, 1, 2, 0]))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert torch.allclose(x.grad, 2 * first)


@pytest.mark.usefixtures("sigmoid_backend")
def test_modules_match_torch_modules():
    weight = torch.rand(4) + 0.5
    ours = fxt.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.05)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = _logits((6, 4), torch.float32)
    target = torch.tensor([0, 1, 2, 3, 2, 1])
    assert_close(ours(x, target), theirs(x, target), torch.float32, "CrossEntropyLoss")
    assert "z_loss" in repr(fxt.CrossEntropyLoss(z_loss=1e-4))
    pos = torch.tensor([1.0, 2.0, 3.0, 0.5])
    bours = fxt.BCEWithLogitsLoss(pos_weight=pos, reduction="sum")
    btheirs = torch.nn.BCEWithLogitsLoss(pos_weight=pos, reduction="sum")
    assert bours.state_dict().keys() == btheirs.state_dict().keys()
    z = torch.rand(6, 4)
    assert_close(bours(x, z), btheirs(x, z), torch.float32, "BCEWithLogitsLoss")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_tensors_are_handed_over_without_a_copy(dtype):
    x = _logits((3, 5), dtype)
    array = fxt._as_array(x)
    assert array.__array_interface__["data"][0] == x.data_ptr()
    assert array.dtype.name == DTYPE_IDS[DTYPES.index(dtype)]
    back = fxt._as_tensor(array)
    assert back.data_ptr() == x.data_ptr() and back.dtype == dtype


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "expanded_target"])
def test_strided_inputs(layout):
    if layout == "transposed":
        x = _logits((5, 6), torch.float32).t()  # (6, 5), class stride 6
        target = torch.tensor([0, 1, 2, 3, 4, 0])
    elif layout == "channels_last":
        x = _logits((2, 3, 4, 5), torch.float32).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(0))
    else:
        x = _logits((6, 5), torch.float32)
        target = torch.tensor([3]).expand(6)  # stride 0
    _compare(lambda xx, **kw: fxt.cross_entropy(xx, target, **kw),
             lambda xx, **kw: F.cross_entropy(xx, target, **kw), x, torch.float32,
             {"reduction": "none"}, layout)


def test_small_model_under_torch_compile():
    try:
        import torch._inductor  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torch inductor is not importable here: {exc}")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    reference.load_state_dict(model.state_dict())
    data = torch.randn(32, 8)
    target = torch.randint(0, 5, (32,))

    def step(net, loss_fn):
        loss = loss_fn(net(data), target, label_smoothing=0.1)
        loss.backward()
        return loss

    compiled = torch.compile(lambda: step(model, fxt.cross_entropy))
    loss = compiled()
    expected = step(reference, F.cross_entropy)
    assert_close(loss.detach(), expected.detach(), torch.float32, "compiled loss")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"compiled grad of {name}")


def test_import_fastxent_imports_no_framework():
    code = ("import fastxent, sys; "
            "loaded = [m for m in ('torch', 'jax', 'tensorflow', 'keras') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
