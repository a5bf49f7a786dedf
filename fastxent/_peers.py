"""The table of comparisons shared by the benchmarks (``bench/``), the
``fastxent bench`` command and the tests that check the peers agree.

Each *op* names what is measured; for each op there is the fastxent call and
the peers that compute the same thing (PyTorch, JAX/optax, TensorFlow, plain
numpy), each imported lazily and skipped when not installed. Every entry is a
*factory*: ``make(logits, labels) -> callable()``, so that conversions (numpy
to torch tensors, jit warm-up) happen outside the timed call, and the callable
returns something comparable to the fastxent result (loss per row, or
``(loss, grad)`` for the fused ops).

The yardstick of every op is ``read``: one pass reading the logits
(``x.max(axis=1)``), the floor of any kernel that must read them.
"""

import numpy as np

from . import losses

#: op -> (description, needs labels kind: "ids" | "binary")
OPS = {
    "sparse_fwd": ("sparse softmax cross-entropy, forward", "ids"),
    "sparse_fwd_bwd": ("sparse softmax cross-entropy, fused forward+backward", "ids"),
    "sigmoid_fwd": ("sigmoid cross-entropy, forward", "binary"),
    "sigmoid_fwd_bwd": ("sigmoid cross-entropy, forward+backward", "binary"),
    "score": ("score bundle (loss, lse, target_logprob, entropy, argmax, correct)", "ids"),
}


def make_labels(op, shape, seed=0):
    """Labels suited to ``op`` for logits of ``shape`` (class ids or 0/1 targets)."""
    rng = np.random.default_rng(seed)
    if OPS[op][1] == "ids":
        return rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int64)
    return (rng.random(shape) < 0.5).astype(np.float32)


# ----------------------------------------------------------------------------
# fastxent itself
# ----------------------------------------------------------------------------

def fastxent_call(op, logits, labels, backend=None):
    """The fastxent call measured for ``op``."""
    if op == "sparse_fwd":
        return lambda: losses.sparse_softmax_cross_entropy(logits, labels, backend=backend)
    if op == "sparse_fwd_bwd":
        return lambda: losses.sparse_softmax_cross_entropy(logits, labels, reduction="mean",
                                                           return_grad=True, backend=backend)
    if op == "sigmoid_fwd":
        return lambda: losses.sigmoid_cross_entropy(logits, labels, backend=backend)
    if op == "sigmoid_fwd_bwd":
        return lambda: losses.sigmoid_cross_entropy(logits, labels, reduction="mean",
                                                    return_grad=True, backend=backend)
    if op == "score":
        return lambda: losses.score(logits, labels, backend=backend)
    raise KeyError(op)


def read_yardstick(logits):
    """One read of the logits: the time any kernel over them must at least take."""
    return lambda: logits.max(axis=-1)


# ----------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------

def _numpy_sparse(logits, labels, with_grad):
    """What a careful numpy user writes: max-shifted two-pass log-softmax in float32."""
    def run():
        shifted = logits - logits.max(axis=-1, keepdims=True)
        exp = np.exp(shifted)
        total = exp.sum(axis=-1, keepdims=True)
        rows = np.arange(logits.shape[0])
        loss = np.log(total[:, 0]) - shifted[rows, labels]
        if not with_grad:
            return loss
        grad = exp / total
        grad[rows, labels] -= 1
        grad /= logits.shape[0]
        return loss.mean(), grad
    return run


def _numpy_score(logits, labels):
    """The numpy composition computing the score fields (several passes)."""
    def run():
        peak = logits.max(axis=-1, keepdims=True)
        shifted = logits - peak
        exp = np.exp(shifted)
        total = exp.sum(axis=-1)
        lse = np.log(total) + peak[:, 0]
        rows = np.arange(logits.shape[0])
        target_logprob = logits[rows, labels] - lse
        probs = exp / total[:, None]
        entropy = lse - (probs * logits).sum(axis=-1)
        argmax = logits.argmax(axis=-1)
        return -target_logprob, lse, target_logprob, entropy, argmax, argmax == labels
    return run


def _numpy_sigmoid(logits, labels, with_grad):
    def run():
        loss = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
        if not with_grad:
            return loss
        grad = (1 / (1 + np.exp(-logits)) - labels) / logits.size
        return loss.mean(), grad
    return run


def _torch_sparse(logits, labels, with_grad):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    if not with_grad:
        def forward():
            with torch.no_grad():
                return F.cross_entropy(x, y, reduction="none").numpy()
        return forward

    def forward_backward():
        leaf = x.detach().requires_grad_(True)
        loss = F.cross_entropy(leaf, y, reduction="mean")
        loss.backward()
        return loss.detach().numpy(), leaf.grad.numpy()
    return forward_backward


def _torch_sigmoid(logits, labels, with_grad):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(logits)
    z = torch.from_numpy(labels)
    if not with_grad:
        def forward():
            with torch.no_grad():
                return F.binary_cross_entropy_with_logits(x, z, reduction="none").numpy()
        return forward

    def forward_backward():
        leaf = x.detach().requires_grad_(True)
        loss = F.binary_cross_entropy_with_logits(leaf, z, reduction="mean")
        loss.backward()
        return loss.detach().numpy(), leaf.grad.numpy()
    return forward_backward


def _jax_sparse(logits, labels, with_grad):
    import jax
    import optax

    x = jax.device_put(logits)
    y = jax.device_put(labels.astype(np.int32))
    if not with_grad:
        fn = jax.jit(optax.softmax_cross_entropy_with_integer_labels)
        return lambda: np.asarray(jax.block_until_ready(fn(x, y)))

    def mean_loss(xx):
        return optax.softmax_cross_entropy_with_integer_labels(xx, y).mean()
    fn = jax.jit(jax.value_and_grad(mean_loss))

    def run():
        loss, grad = jax.block_until_ready(fn(x))
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


#: op -> {peer name: factory(logits, labels) -> callable}
PEERS = {
    "sparse_fwd": {
        "numpy": lambda x, y: _numpy_sparse(x, y, False),
        "torch": lambda x, y: _torch_sparse(x, y, False),
        "jax": lambda x, y: _jax_sparse(x, y, False),
        "tensorflow": lambda x, y: _tf_sparse(x, y, False),
    },
    "sparse_fwd_bwd": {
        "numpy": lambda x, y: _numpy_sparse(x, y, True),
        "torch": lambda x, y: _torch_sparse(x, y, True),
        "jax": lambda x, y: _jax_sparse(x, y, True),
        "tensorflow": lambda x, y: _tf_sparse(x, y, True),
    },
    "sigmoid_fwd": {
        "numpy": lambda x, y: _numpy_sigmoid(x, y, False),
        "torch": lambda x, y: _torch_sigmoid(x, y, False),
    },
    "sigmoid_fwd_bwd": {
        "numpy": lambda x, y: _numpy_sigmoid(x, y, True),
        "torch": lambda x, y: _torch_sigmoid(x, y, True),
    },
    "score": {
        "numpy": _numpy_score,
    },
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
