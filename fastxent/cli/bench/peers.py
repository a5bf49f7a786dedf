"""What ``fastxent bench`` (and the scripts in ``bench/``) compares: for each op
of :data:`.cases.OPS`, the fastxent call, the yardstick and the peers.

The peers compute the same thing as fastxent: PyTorch, JAX/optax, TensorFlow,
plain numpy on the host; PyTorch eager and compiled on a CUDA device, each
imported lazily and skipped when not installed. Every entry is a *factory*:
``make(logits, labels) -> callable()``, so that conversions (numpy to torch
tensors, jit warm-up) happen outside the timed call, and the callable returns
something comparable to the fastxent result (loss per row, ``(loss, grad)``
for the fused ops, the six score fields for ``score``). Host peers return
numpy arrays; device peers return device tensors (copy them to the host with
:func:`to_host`, outside the timing).

The yardstick of every op is ``read``: one pass reading the logits
(``x.max()``), the floor of any kernel that must read them.
"""

from functools import partial

import numpy as np

import fastxent as fx

from .cases import as_float32

# ----------------------------------------------------------------------------
# fastxent itself
# ----------------------------------------------------------------------------

def fastxent_call(op, logits, labels, backend=None):
    """The fastxent call measured for ``op``."""
    if op == "sparse_fwd":
        return lambda: fx.sparse_softmax_cross_entropy(logits, labels, backend=backend)
    if op == "sparse_fwd_bwd":
        return lambda: fx.sparse_softmax_cross_entropy(logits, labels, reduction="mean",
                                                           return_grad=True, backend=backend)
    if op == "sigmoid_fwd":
        return lambda: fx.sigmoid_cross_entropy(logits, labels, backend=backend)
    if op == "sigmoid_fwd_bwd":
        return lambda: fx.sigmoid_cross_entropy(logits, labels, reduction="mean",
                                                    return_grad=True, backend=backend)
    if op == "score":
        return lambda: fx.score(logits, labels, backend=backend)
    raise KeyError(op)


def read_yardstick(logits):
    """One read of the logits: the time any kernel over them must at least take.

    A full reduction, ``x.max()``, over every element at once: one pass over
    the bytes at the memory's speed whatever the row length. (``x.max(axis=-1)``,
    used before, costs numpy a reduction per row: 42 ms for 1,000,000 x 10
    float32 here, 0.9 GB/s, against 1.8 ms for ``x.max()``, so kernels on short
    rows looked faster than reading their input.) For bfloat16, whose numpy
    ufuncs are scalar loops in ml_dtypes (0.78 s for 4096x32000, against
    0.026 s for the same bytes as uint16), the max of the same bytes viewed as
    ``uint16``: the yardstick is the read, not the comparison.
    """
    if isinstance(logits, np.ndarray) and logits.dtype.name == "bfloat16":
        bits = logits.view(np.uint16)
        return lambda: bits.max()
    return lambda: logits.max()


# ----------------------------------------------------------------------------
# Host peers (numpy widens 16-bit scores to float32 first, as a numpy user would)
# ----------------------------------------------------------------------------

def _numpy_sparse(logits, labels, with_grad):
    """What a careful numpy user writes: max-shifted two-pass log-softmax in float32."""
    def run():
        x = as_float32(logits)
        shifted = x - x.max(axis=-1, keepdims=True)
        exp = np.exp(shifted)
        total = exp.sum(axis=-1, keepdims=True)
        rows = np.arange(x.shape[0])
        loss = np.log(total[:, 0]) - shifted[rows, labels]
        if not with_grad:
            return loss
        grad = exp / total
        grad[rows, labels] -= 1
        grad /= x.shape[0]
        return loss.mean(), grad
    return run


def _numpy_score(logits, labels):
    """The numpy composition computing the score fields (several passes)."""
    def run():
        x = as_float32(logits)
        peak = x.max(axis=-1, keepdims=True)
        shifted = x - peak
        exp = np.exp(shifted)
        total = exp.sum(axis=-1)
        lse = np.log(total) + peak[:, 0]
        rows = np.arange(x.shape[0])
        target_logprob = x[rows, labels] - lse
        probs = exp / total[:, None]
        entropy = lse - (probs * x).sum(axis=-1)
        argmax = x.argmax(axis=-1)
        return -target_logprob, lse, target_logprob, entropy, argmax, argmax == labels
    return run


def _numpy_sigmoid(logits, labels, with_grad):
    @np.errstate(over="ignore")  # exp(-x) -> inf for x < -88 gives the right 0 in 1 / (1 + inf)
    def run():
        x = as_float32(logits)
        loss = np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))
        if not with_grad:
            return loss
        grad = (1 / (1 + np.exp(-x)) - labels) / x.size
        return loss.mean(), grad
    return run


def _torch_tensor(array):
    """A torch view of a numpy (bfloat16 included) or CUDA array, without a copy."""
    import torch

    if isinstance(array, np.ndarray):
        if array.dtype.name == "bfloat16":  # torch.from_numpy does not know ml_dtypes
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    if str(array.dtype) == "bfloat16":  # CuPy >= 14 bfloat16: its interface typestr is raw '<V2'
        return torch.as_tensor(array.view(np.int16), device="cuda").view(torch.bfloat16)
    return torch.as_tensor(array, device="cuda")  # __cuda_array_interface__: zero-copy


def _torch_out(tensor, host):
    """numpy for host peers (bfloat16 kept as ml_dtypes.bfloat16); the tensor on a device."""
    import torch

    tensor = tensor.detach()
    if not host:
        return tensor
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _torch_loss(loss, logits, labels, with_grad, compiled=False, float_targets=False):
    """``loss`` (a ``torch.nn.functional`` loss): per element, or mean with its gradient.

    ``float_targets``: the labels are cast to the logits' dtype, as torch's
    ``binary_cross_entropy_with_logits`` wants. The fused pass makes a fresh
    leaf each call, so no gradient accumulates across calls.
    """
    import torch

    host = isinstance(logits, np.ndarray)
    x = _torch_tensor(logits)
    y = _torch_tensor(labels)
    if float_targets:
        y = y.to(x.dtype)
    if not with_grad:
        fn = torch.compile(loss) if compiled else loss

        def forward():
            with torch.no_grad():
                return _torch_out(fn(x, y, reduction="none"), host)
        return forward

    def mean_loss(xx, yy):
        return loss(xx, yy, reduction="mean")
    fn = torch.compile(mean_loss) if compiled else mean_loss

    def forward_backward():
        leaf = x.detach().requires_grad_(True)
        value = fn(leaf, y)
        value.backward()
        return _torch_out(value, host), _torch_out(leaf.grad, host)
    return forward_backward


def _torch_sparse(logits, labels, with_grad, compiled=False):
    import torch.nn.functional as F

    return _torch_loss(F.cross_entropy, logits, labels, with_grad, compiled)


def _torch_sigmoid(logits, labels, with_grad, compiled=False):
    import torch.nn.functional as F

    return _torch_loss(F.binary_cross_entropy_with_logits, logits, labels, with_grad, compiled,
                       float_targets=True)


def _torch_score(logits, labels, compiled=False):
    """The score fields as a torch user computes them (16-bit scores widened to float32)."""
    import torch

    host = isinstance(logits, np.ndarray)
    x = _torch_tensor(logits)
    y = _torch_tensor(labels)

    def fields(xx, yy):
        xx = xx.float()
        lse = torch.logsumexp(xx, dim=-1)
        target_logprob = xx.gather(-1, yy.unsqueeze(-1)).squeeze(-1) - lse
        probs = torch.softmax(xx, dim=-1)
        entropy = lse - (probs * xx).sum(dim=-1)
        argmax = xx.argmax(dim=-1)
        return -target_logprob, lse, target_logprob, entropy, argmax, argmax == yy
    fn = torch.compile(fields) if compiled else fields

    def run():
        with torch.no_grad():
            return tuple(_torch_out(field, host) for field in fn(x, y))
    return run


def _jax_sparse(logits, labels, with_grad):
    import jax
    import optax

    x = jax.device_put(logits)
    y = jax.device_put(labels.astype(np.int32))
    if not with_grad:
        fn = jax.jit(optax.softmax_cross_entropy_with_integer_labels)
        return lambda: np.asarray(jax.block_until_ready(fn(x, y)))

    # The labels are an argument, not a closed-over constant: as a constant, XLA
    # constant-folds the gradient's scatter over every row (minutes at 1,000,000 rows).
    def mean_loss(xx, yy):
        return optax.softmax_cross_entropy_with_integer_labels(xx, yy).mean()
    fn = jax.jit(jax.value_and_grad(mean_loss))

    def run():
        loss, grad = jax.block_until_ready(fn(x, y))
        return np.asarray(loss), np.asarray(grad)
    return run


def _tf_sparse(logits, labels, with_grad):
    import tensorflow as tf

    x = tf.constant(logits)
    y = tf.constant(labels)
    if not with_grad:
        return lambda: tf.nn.sparse_softmax_cross_entropy_with_logits(y, x).numpy()

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, x))
        return loss.numpy(), tape.gradient(loss, x).numpy()
    return run


def _forward_and_fused(family, **factories):
    """``{family_fwd: {peer: factory}, family_fwd_bwd: {...}}`` from ``factory(x, y, with_grad)``."""
    return {f"{family}{suffix}": {name: partial(make, with_grad=with_grad) for name, make in factories.items()}
            for suffix, with_grad in (("_fwd", False), ("_fwd_bwd", True))}


#: op -> {peer name: factory(logits, labels) -> callable}, host (numpy) arrays,
#: the peers in the order of the table's columns.
PEERS = {
    **_forward_and_fused("sparse", numpy=_numpy_sparse, torch=_torch_sparse, jax=_jax_sparse,
                         tensorflow=_tf_sparse),
    **_forward_and_fused("sigmoid", numpy=_numpy_sigmoid, torch=_torch_sigmoid),
    "score": {"numpy": _numpy_score, "torch": _torch_score},
}

_PEER_MODULES = {"torch": "torch", "jax": "optax", "tensorflow": "tensorflow", "numpy": "numpy"}


def installed_peers(op):
    """Names of the peers of ``op`` whose library imports here."""
    import importlib.util

    return [name for name in PEERS.get(op, {})
            if importlib.util.find_spec(_PEER_MODULES[name]) is not None]


def peer_call(op, peer, logits, labels):
    """The callable measuring ``peer`` on ``op`` (raises ImportError when not installed)."""
    return PEERS[op][peer](logits, labels)


# ----------------------------------------------------------------------------
# Device (CUDA) peers: factories take CuPy arrays, callables return torch CUDA tensors
# ----------------------------------------------------------------------------

#: op -> {peer name: factory(logits, labels) -> callable}, CUDA (CuPy) arrays:
#: torch's host peers, eager and under torch.compile (inductor/Triton
#: kernels; its compilation happens in the warm-up call, outside the timing).
GPU_PEERS = {op: {"torch-cuda": table["torch"], "torch-compile-cuda": partial(table["torch"], compiled=True)}
             for op, table in PEERS.items()}


def installed_gpu_peers(op):
    """Names of the CUDA peers of ``op`` usable here (torch built with CUDA and a device;
    Triton as well for the compiled one)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    names = ["torch-cuda"]
    if importlib.util.find_spec("triton") is not None:
        names.append("torch-compile-cuda")
    return [name for name in names if name in GPU_PEERS.get(op, {})]


def gpu_peer_call(op, peer, logits, labels):
    """The callable measuring CUDA ``peer`` on ``op`` for CuPy ``logits``/``labels``."""
    return GPU_PEERS[op][peer](logits, labels)


def to_host(result):
    """A result (numpy, CuPy, torch tensor, or a tuple of them) with every array on the host."""
    if isinstance(result, tuple):
        return tuple(to_host(item) for item in result)
    if isinstance(result, np.ndarray) or np.isscalar(result):
        return result
    if hasattr(result, "get") and hasattr(result, "__cuda_array_interface__"):  # CuPy
        return result.get()
    if type(result).__module__.startswith("torch"):
        return _torch_out(result.cpu(), host=True)
    return np.asarray(result)
