"""Keras 3 adapter: Keras's cross-entropy losses computed by fastxent (TensorFlow backend).

Drop-in subclasses of Keras's own loss classes, same constructors, configs
and reductions::

    import fastxent.keras as fxk
    model.compile(optimizer="adam", loss=fxk.SparseCategoricalCrossentropy(from_logits=True))

* ``from_logits=True`` runs fastxent's score families
  (``sparse_softmax_cross_entropy``, ``softmax_cross_entropy``,
  ``sigmoid_cross_entropy``); ``from_logits=False`` its probability families
  (``sparse_categorical_cross_entropy``, ``categorical_cross_entropy``,
  ``binary_cross_entropy``, with ``epsilon = keras.config.epsilon()``).
  As Keras's TensorFlow backend does, a ``y_pred`` produced by a softmax
  (sigmoid) activation is recognised and its logits are used instead of the
  probabilities.
* ``label_smoothing`` (categorical, binary) and ``ignore_class`` (sparse)
  behave as in Keras; ``ignore_class`` rows get loss 0 and a Keras mask, so
  ``"sum_over_batch_size"`` averages over the rows that count.
* The reductions (``"sum_over_batch_size"``, ``"sum"``, ``"mean"``,
  ``"mean_with_sample_weight"``, ``"none"``/``None``), ``sample_weight`` and
  masks are Keras's own: the classes inherit ``keras.losses.Loss.__call__`` and
  only the per-example loss function is replaced.
* Configs round-trip every constructor argument: ``get_config`` is Keras's
  plus ``axis`` (which Keras's ``SparseCategoricalCrossentropy`` leaves out, so
  a reloaded model would lose it) and ``dtype`` (which Keras's ``Loss`` leaves
  out); the classes are registered serialisable (``fastxent>...``), so a model
  saved with ``model.save("x.keras")`` reloads with ``keras.models.load_model``
  and computes the same loss.
* Shapes are checked while tracing, with Keras's own ``ValueError`` and message
  (``"Arguments `target` and `output` must have the same shape ..."``), before
  anything runs on the host.

How the computation runs
------------------------
The per-example (per-element for binary) loss is a ``tf.custom_gradient``
around ``tf.numpy_function``: TensorFlow hands the host buffers to fastxent's
Numba kernels. The forward runs the forward-only kernel; the gradient function
runs the fused kernel once more with the incoming per-example gradient as
``grad_output``, so nothing logits-sized is kept between the two and an
evaluation step (no gradient asked) never computes one. Host calls are
serialised (``fastxent._adapters.HOST_LOCK``): TensorFlow runs independent ops
on parallel threads, and each kernel uses every core. (The torch adapter
keeps the gradient from a fused forward instead: there the forward knows that
a backward will follow; a TensorFlow forward does not.)

Limits: first derivatives only (a nested ``GradientTape`` asking for second
derivatives gets a ``NotImplementedError``, not a silently missing term);
``tf.numpy_function`` runs on the host and cannot be compiled by XLA.
Keras resolves ``jit_compile="auto"`` to False on CPU-only machines; where a
GPU is visible, compile with ``jit_compile=False``. Only the TensorFlow
backend of Keras is supported (with another backend the call raises).
Differences from Keras on purpose: any ``axis`` works for the sparse loss
(Keras on TensorFlow refuses ``axis != -1``); a softmax over a single class is
a ``ValueError`` pointing to ``BinaryCrossentropy`` (Keras warns and returns 0);
with ``from_logits=False`` the sparse loss
normalises the probabilities before clipping them (Keras's JAX/NumPy/torch
backends; its TensorFlow backend clips first: the same values unless a
probability is clipped), and ``label_smoothing`` of the categorical loss uses
the size of ``axis`` (Keras uses the last axis whatever ``axis`` is).
"""

import numpy as np
import keras

import fastxent as fx
from fastxent._adapters import host_call

__all__ = [
    "BinaryCrossentropy",
    "CategoricalCrossentropy",
    "SparseCategoricalCrossentropy",
    "binary_crossentropy",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
]


# ----------------------------------------------------------------------------
# The fused op: forward on the host, gradient on the host
# ----------------------------------------------------------------------------

def _tensorflow():
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            f"fastxent.keras runs on Keras's TensorFlow backend, but KERAS_BACKEND is "
            f"{keras.backend.backend()!r}; with JAX use fastxent.jax, with torch fastxent.torch")
    import tensorflow as tf

    return tf


def _numpy_dtype(dtype):
    return np.dtype(dtype.as_numpy_dtype)


def _fused(function, first, labels, loss_shape, **options):
    """``function(first, labels, **options)`` as a TF op whose gradient is fastxent's.

    ``first`` (scores or probabilities) gets the gradient; ``labels`` do not
    (Keras's losses are not differentiated with respect to ``y_true``).
    """
    tf = _tensorflow()
    loss_dtype = first.dtype

    def forward(x, y):
        loss = host_call(function, x, y, **options)
        return np.asarray(loss, dtype=_numpy_dtype(loss_dtype))

    def backward(x, y, dy):
        _, grad = host_call(function, x, y, **options, return_grad=True, grad_output=dy)
        return np.asarray(grad, dtype=x.dtype)

    @tf.custom_gradient
    def first_order_only(x, dy):
        grad = tf.numpy_function(backward, [x, labels, dy], x.dtype, stateful=False)
        grad.set_shape(x.shape)

        def second_order(_):
            # A numpy_function has no gradient: without this, a nested tape would
            # silently leave the loss's second-order terms out.
            raise NotImplementedError(
                "fastxent.keras computes first derivatives only; for second derivatives (a nested "
                "GradientTape) use Keras's own loss, or fastxent.jax / fastxent.torch")

        return grad, second_order

    @tf.custom_gradient
    def op(x):
        loss = tf.numpy_function(forward, [x, labels], loss_dtype, stateful=False)
        loss.set_shape(loss_shape)

        def gradient(dy):
            return first_order_only(x, dy)

        return loss, gradient

    return op(first)


def _without_axis(shape, axis):
    rank = shape.rank
    ax = axis % rank
    return shape[:ax].concatenate(shape[ax + 1:])


def _from_activation(output, from_logits, op_type):
    """Keras's TensorFlow backend rule: the logits behind a softmax/sigmoid output are used."""
    if hasattr(output, "_keras_logits"):
        return output._keras_logits, True
    tf = _tensorflow()
    from_op = (hasattr(output, "op") and not isinstance(output, (tf.__internal__.EagerTensor, tf.Variable))
               and output.op.type == op_type)
    if from_op and len(output.op.inputs) == 1:
        return output.op.inputs[0], True
    return output, from_logits


def _set_mask(tensor, mask):
    try:
        from keras.src.backend.common.masking import set_keras_mask
    except ImportError:  # pragma: no cover -- older/newer Keras layouts
        tensor._keras_mask = mask
    else:
        set_keras_mask(tensor, mask)


# ----------------------------------------------------------------------------
# Keras's own trace-time checks (keras/src/backend/tensorflow/nn.py), its messages
# ----------------------------------------------------------------------------

def _check_same_shape(target, output, at_least_rank_1=False):
    """Categorical and binary: ``target`` and ``output`` of one shape (unknown dims pass)."""
    if at_least_rank_1 and len(target.shape) < 1:
        raise ValueError("Arguments `target` and `output` must be at least rank 1. Received: "
                         f"target.shape={target.shape}, output.shape={output.shape}")
    if len(target.shape) != len(output.shape):
        raise ValueError("Arguments `target` and `output` must have the same rank (ndim). Received: "
                         f"target.shape={target.shape}, output.shape={output.shape}")
    for e1, e2 in zip(target.shape, output.shape):
        if e1 is not None and e2 is not None and e1 != e2:
            raise ValueError("Arguments `target` and `output` must have the same shape. Received: "
                             f"target.shape={target.shape}, output.shape={output.shape}")


def _check_sparse_shapes(target, output, axis):
    """Sparse: ``target`` has ``output``'s shape without ``axis`` (Keras on TensorFlow: the last)."""
    if len(output.shape) < 1:
        raise ValueError(f"Argument `output` must be at least rank 1. Received: output.shape={output.shape}")
    if len(target.shape) != len(output.shape) - 1:
        raise ValueError("Argument `output` must have rank (ndim) `target.ndim - 1`. Received: "
                         f"target.shape={target.shape}, output.shape={output.shape}")
    ax = axis % len(output.shape)
    where = ("up until the last dimension" if ax == len(output.shape) - 1
             else f"apart from the class axis {axis}")
    for e1, e2 in zip(target.shape, _without_axis(output.shape, axis)):
        if e1 is not None and e2 is not None and e1 != e2:
            raise ValueError(f"Arguments `target` and `output` must have the same shape {where}: "
                             f"target.shape={target.shape}, output.shape={output.shape}")


def _check_classes(function, output, axis, alternative):
    """fastxent's rule at trace time: a softmax over one class is refused (Keras returns 0)."""
    if len(output.shape) and output.shape[axis] == 1:
        raise ValueError(f"{function} over a single class (C == 1) is always 0; for a binary problem "
                         f"with one score per example use {alternative}")


# ----------------------------------------------------------------------------
# Per-example loss functions (Keras's signatures)
# ----------------------------------------------------------------------------

def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False, ignore_class=None, axis=-1):
    """``keras.losses.sparse_categorical_crossentropy``, computed by fastxent.

    Examples
    --------
    >>> import fastxent.keras as fxk
    >>> loss = fxk.sparse_categorical_crossentropy([1, 2], [[0.05, 0.95, 0.0], [0.1, 0.8, 0.1]])
    """
    tf = _tensorflow()
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == y_pred.shape.rank and y_true.shape[axis] == 1:
        y_true = tf.squeeze(y_true, axis=axis)
    y_pred, from_logits = _from_activation(y_pred, from_logits, "Softmax")
    labels = tf.cast(y_true, "int64")
    _check_sparse_shapes(labels, y_pred, axis)
    _check_classes("sparse_categorical_crossentropy", y_pred, axis, "BinaryCrossentropy")
    ignore_index = None if ignore_class is None else int(ignore_class)
    loss_shape = _without_axis(y_pred.shape, axis)
    if from_logits:
        loss = _fused(fx.sparse_softmax_cross_entropy, y_pred, labels, loss_shape, axis=axis,
                      ignore_index=ignore_index)
    else:
        loss = _fused(fx.sparse_categorical_cross_entropy, y_pred, labels, loss_shape, axis=axis,
                      epsilon=keras.config.epsilon(), ignore_index=ignore_index)
    if ignore_index is not None:
        _set_mask(loss, tf.not_equal(labels, ignore_index))
    return loss


def categorical_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
    """``keras.losses.categorical_crossentropy``, computed by fastxent.

    Examples
    --------
    >>> import fastxent.keras as fxk
    >>> loss = fxk.categorical_crossentropy([[0.0, 1.0, 0.0]], [[0.05, 0.95, 0.0]])
    """
    tf = _tensorflow()
    if isinstance(axis, bool):
        raise ValueError(f"`axis` must be of type `int`. Received: axis={axis} of type {type(axis)}")
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.cast(y_true, y_pred.dtype)
    _check_same_shape(y_true, y_pred, at_least_rank_1=True)
    y_pred, from_logits = _from_activation(y_pred, from_logits, "Softmax")
    _check_classes("categorical_crossentropy", y_pred, axis, "BinaryCrossentropy")
    loss_shape = _without_axis(y_pred.shape, axis)
    if from_logits:
        return _fused(fx.softmax_cross_entropy, y_pred, y_true, loss_shape, axis=axis,
                      label_smoothing=float(label_smoothing))
    return _fused(fx.categorical_cross_entropy, y_pred, y_true, loss_shape, axis=axis,
                  epsilon=keras.config.epsilon(), label_smoothing=float(label_smoothing))


def binary_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
    """``keras.losses.binary_crossentropy``: the elementwise loss averaged over ``axis``.

    Examples
    --------
    >>> import fastxent.keras as fxk
    >>> loss = fxk.binary_crossentropy([[0.0, 1.0]], [[0.4, 0.6]])
    """
    tf = _tensorflow()
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.cast(y_true, y_pred.dtype)
    _check_same_shape(y_true, y_pred)
    y_pred, from_logits = _from_activation(y_pred, from_logits, "Sigmoid")
    if from_logits:
        elements = _fused(fx.sigmoid_cross_entropy, y_pred, y_true, y_pred.shape,
                          label_smoothing=float(label_smoothing))
    else:
        elements = _fused(fx.binary_cross_entropy, y_pred, y_true, y_pred.shape,
                          epsilon=keras.config.epsilon(), label_smoothing=float(label_smoothing))
    return tf.reduce_mean(elements, axis=axis)


# ----------------------------------------------------------------------------
# Loss classes: Keras's own, with the per-example function replaced
# ----------------------------------------------------------------------------

def _with_dtype(loss, config):
    """``config`` with the constructor's ``dtype`` (Keras's ``Loss.get_config`` drops it), so
    ``from_config(get_config())`` rebuilds every constructor argument."""
    dtype = loss._dtype_argument
    if dtype is not None and not isinstance(dtype, str):
        dtype = keras.dtype_policies.serialize(dtype)
    return {**config, "dtype": dtype}


@keras.saving.register_keras_serializable(package="fastxent")
class SparseCategoricalCrossentropy(keras.losses.SparseCategoricalCrossentropy):
    """``keras.losses.SparseCategoricalCrossentropy`` computed by fastxent.

    Examples
    --------
    >>> import fastxent.keras as fxk
    >>> loss = fxk.SparseCategoricalCrossentropy(from_logits=True)
    >>> value = loss([1, 2], [[0.1, 2.0, -1.0], [0.3, 0.2, 1.5]])
    """

    def __init__(self, from_logits=False, ignore_class=None, reduction="sum_over_batch_size", axis=-1,
                 name="sparse_categorical_crossentropy", dtype=None):
        super().__init__(from_logits=from_logits, ignore_class=ignore_class, reduction=reduction, axis=axis,
                         name=name, dtype=dtype)
        self.fn = sparse_categorical_crossentropy
        self.axis = axis
        self._dtype_argument = dtype

    def get_config(self):
        """Keras's config plus ``axis`` (which Keras's own class leaves out) and ``dtype``."""
        return _with_dtype(self, {**super().get_config(), "axis": self.axis})


@keras.saving.register_keras_serializable(package="fastxent")
class CategoricalCrossentropy(keras.losses.CategoricalCrossentropy):
    """``keras.losses.CategoricalCrossentropy`` computed by fastxent.

    Examples
    --------
    >>> import fastxent.keras as fxk
    >>> loss = fxk.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    >>> value = loss([[0.0, 1.0, 0.0]], [[0.1, 2.0, -1.0]])
    """

    def __init__(self, from_logits=False, label_smoothing=0.0, axis=-1, reduction="sum_over_batch_size",
                 name="categorical_crossentropy", dtype=None):
        super().__init__(from_logits=from_logits, label_smoothing=label_smoothing, axis=axis,
                         reduction=reduction, name=name, dtype=dtype)
        self.fn = categorical_crossentropy
        self._dtype_argument = dtype

    def get_config(self):
        """Keras's config (``axis`` included) plus ``dtype``."""
        return _with_dtype(self, super().get_config())


@keras.saving.register_keras_serializable(package="fastxent")
class BinaryCrossentropy(keras.losses.BinaryCrossentropy):
    """``keras.losses.BinaryCrossentropy`` computed by fastxent.

    Examples
    --------
    >>> import fastxent.keras as fxk
    >>> loss = fxk.BinaryCrossentropy(from_logits=True)
    >>> value = loss([[0.0, 1.0]], [[-1.0, 2.0]])
    """

    def __init__(self, from_logits=False, label_smoothing=0.0, axis=-1, reduction="sum_over_batch_size",
                 name="binary_crossentropy", dtype=None):
        super().__init__(from_logits=from_logits, label_smoothing=label_smoothing, axis=axis,
                         reduction=reduction, name=name, dtype=dtype)
        self.fn = binary_crossentropy
        self._dtype_argument = dtype

    def get_config(self):
        """Keras's config (``axis`` included) plus ``dtype``."""
        return _with_dtype(self, super().get_config())
