"""fastxent.torch.linear_cross_entropy and LinearCrossEntropyLoss against PyTorch 2.13's own.

The oracle is ``torch.nn.functional.linear_cross_entropy`` (its reference path,
``options=None``: ``cross_entropy(linear(...))``) run in float64 on the same inputs
upcast, so a 16-bit result is compared with the exact value rounded once; the chunked
path (``options=LinearCrossEntropyOptions()``) once as well. Each case checks the loss
and the gradients of ``input``, ``linear_weight`` and ``linear_bias`` for an incoming
gradient of 1, 0.7 or a random one per row. Small shapes (N = 12, H = 6, C = 11).
"""

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastxent.torch as fxt  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: (rtol, atol as a fraction of the largest expected element), per dtype
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6), torch.bfloat16: (1.6e-2, 1.6e-2),
             torch.float16: (2e-3, 2e-3)}
N, H, C = 12, 6, 11


def make(dtype, bias=True, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(C, H, generator=g) / 2).to(dtype).requires_grad_(True)
    linear_bias = torch.randn(C, generator=g).to(dtype).requires_grad_(True) if bias else None
    target = torch.randint(0, C, (n,), generator=g)
    return hidden, weight, linear_bias, target


def run(function, hidden, head, head_bias, target, grad_output, **options):
    """The loss and the gradients of ``hidden``, ``head`` and ``head_bias`` (None when absent)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, head, head_bias)]
    loss = function(leaves[0], leaves[1], target, linear_bias=leaves[2], **options)
    incoming = grad_output if torch.is_tensor(grad_output) else torch.tensor(grad_output)
    loss.backward(incoming.to(loss.dtype))
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def assert_matches_torch(dtype, hidden, head, head_bias, target, grad_output, **options):
    """fastxent's loss and gradients against torch's in float64 on the same inputs upcast."""
    loss, grads = run(fxt.linear_cross_entropy, hidden, head, head_bias, target, grad_output, **options)
    options.pop("memory", None)
    up = [None if t is None else t.detach().double() for t in (hidden, head, head_bias)]
    if isinstance(options.get("weight"), torch.Tensor):
        options["weight"] = options["weight"].double()
    incoming = grad_output.double() if torch.is_tensor(grad_output) else grad_output
    expected_loss, expected_grads = run(F.linear_cross_entropy, *up, target, incoming, **options)
    rtol, fraction = TOLERANCE[dtype]
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), expected_loss, rtol=rtol, atol=fraction, equal_nan=True)
    for name, got, expected, like in zip(("input", "linear_weight", "linear_bias"), grads, expected_grads,
                                         (hidden, head, head_bias)):
        if like is None:
            continue
        assert got.dtype == like.dtype and got.shape == like.shape, name
        peak = float(expected.abs().max()) if expected.numel() and expected.isfinite().all() else 1.0
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=fraction * peak + 1e-12, equal_nan=True,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_matches_torch(dtype, reduction):
    hidden, weight, linear_bias, target = make(dtype)
    target[3] = -100
    grad_output = torch.randn(N, dtype=torch.float64) if reduction == "none" else 0.7
    assert_matches_torch(dtype, hidden, weight, linear_bias, target, grad_output, reduction=reduction,
                         weight=torch.rand(C) + 0.5, label_smoothing=0.1, memory=4 * C * 4)


@pytest.mark.parametrize("options", [{}, {"ignore_index": 2}, {"label_smoothing": 0.2, "reduction": "sum"}],
                         ids=["plain", "ignore_index", "smoothing"])
def test_without_bias_grad_output_one_and_unbatched(options):
    hidden, weight, _, target = make(torch.float32, bias=False)
    assert_matches_torch(torch.float32, hidden, weight, None, target, 1.0, **options)
    assert_matches_torch(torch.float32, hidden[0], weight, None, target[0], 1.0, **options)


def test_matches_torch_chunked_path():
    hidden, weight, linear_bias, target = make(torch.float32)
    options = torch.nn.LinearCrossEntropyOptions()
    loss, grads = run(fxt.linear_cross_entropy, hidden, weight, linear_bias, target, 1.0, options=options)
    expected_loss, expected_grads = run(F.linear_cross_entropy, hidden, weight, linear_bias, target, 1.0,
                                        options=options)
    torch.testing.assert_close(loss, expected_loss)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)


def test_module_matches_torch_module():
    torch.manual_seed(3)
    ours = fxt.LinearCrossEntropyLoss(H, C, bias=True, label_smoothing=0.1, ignore_index=0, memory="1K")
    theirs = torch.nn.LinearCrossEntropyLoss(H, C, bias=True, label_smoothing=0.1, ignore_index=0)
    theirs.load_state_dict(ours.state_dict())
    hidden, _, _, target = make(torch.float32)
    losses = [module(hidden, target) for module in (ours, theirs)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=2e-6)
    assert "memory='1K'" in repr(ours)


@pytest.mark.parametrize("case", ["all ignored", "zero class weights"])
def test_mean_over_nothing_is_nan_as_in_torch(case):
    hidden, weight, linear_bias, target = make(torch.float64)
    class_weight = None
    if case == "all ignored":
        target = torch.full((N,), -100)
    else:
        target[::2] = -100
        class_weight = torch.zeros(C, dtype=torch.float64)
    assert_matches_torch(torch.float64, hidden, weight, linear_bias, target, 1.0, weight=class_weight)
    loss = fxt.linear_cross_entropy(hidden, weight, target, weight=class_weight)
    assert math.isnan(float(loss.detach()))


def test_forward_only_and_no_grad():
    hidden, weight, linear_bias, target = make(torch.float32)
    with torch.no_grad():
        loss = fxt.linear_cross_entropy(hidden, weight, target, linear_bias=linear_bias, reduction="none")
    assert loss.grad_fn is None and loss.shape == (N,)
    expected = F.linear_cross_entropy(hidden, weight, target, linear_bias=linear_bias, reduction="none")
    torch.testing.assert_close(loss, expected.detach())


def test_what_fastxent_does_not_run_goes_to_torch():
    hidden, weight, linear_bias, target = make(torch.float32)
    probabilities = torch.softmax(torch.randn(N, C), dim=1)
    torch.testing.assert_close(fxt.linear_cross_entropy(hidden, weight, probabilities),
                               F.linear_cross_entropy(hidden, weight, probabilities))
    k_dimensional = weight.detach().reshape(C, 1, H).expand(C, 2, H)
    torch.testing.assert_close(fxt.linear_cross_entropy(hidden, k_dimensional, target[:, None].expand(N, 2)),
                               F.linear_cross_entropy(hidden, k_dimensional, target[:, None].expand(N, 2)))
    with pytest.raises(ValueError, match="z_loss and softcap"):
        fxt.linear_cross_entropy(hidden, weight, probabilities, z_loss=0.1)


def test_errors():
    hidden, weight, linear_bias, target = make(torch.float32)
    with pytest.raises(TypeError, match="options must be a torch.nn.LinearCrossEntropyOptions"):
        fxt.linear_cross_entropy(hidden, weight, target, options={"batch_chunk_size": 4})
    with pytest.raises(ValueError, match=r"labels\[1\] = 11 is outside \[0, 11\)"):
        fxt.linear_cross_entropy(hidden, weight, torch.tensor([0, 11] + [0] * (N - 2)))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        fxt.linear_cross_entropy(hidden.detach().numpy(), weight, target)
    loss = fxt.linear_cross_entropy(hidden, weight, target, linear_bias=linear_bias)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_head_only_training_and_negative_class_weights():
    """Only the head requires grad (frozen features); class weights of any sign, as torch."""
    hidden, weight, linear_bias, target = make(torch.float64)
    class_weight = torch.linspace(-1.0, 2.0, C, dtype=torch.float64)
    frozen = hidden.detach()
    losses, grads = [], []
    for function in (fxt.linear_cross_entropy, F.linear_cross_entropy):
        head = weight.detach().clone().requires_grad_(True)
        loss = function(frozen, head, target, weight=class_weight, reduction="sum")
        loss.backward()
        losses.append(loss.detach())
        grads.append(head.grad)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_torch_func_and_forward_mode_go_to_torch():
    hidden, weight, linear_bias, target = make(torch.float64)
    h, w = hidden.detach(), weight.detach()

    def ours(h):
        return fxt.linear_cross_entropy(h, w, target)

    def theirs(h):
        return F.linear_cross_entropy(h, w, target)

    torch.testing.assert_close(torch.func.grad(ours)(h), torch.func.grad(theirs)(h))
    tangent = torch.ones_like(h)
    torch.testing.assert_close(torch.func.jvp(ours, (h,), (tangent,))[1], torch.func.jvp(theirs, (h,), (tangent,))[1])
