"""Compute backends: kernels that trust their inputs.

The public layer (``fastxent/losses.py``) validates every argument, moves the
class axis last and hands each backend *normalised* arrays. A backend package
(``fastxent.backends.numba`` on numpy arrays, ``fastxent.backends.cuda`` on
CuPy arrays) exposes the same functions with the same contract;
``fastxent/reference.py`` is the float64 oracle they are tested against and is
called by the public layer directly for ``backend="numpy"``.

Contract of a backend function
------------------------------
* Row families (softmax, categorical, score, hvp, building blocks) receive
  ``logits``/``probs`` as a C-contiguous 2-D array ``(N, C)`` whose rows are the
  class axis; sparse ``labels`` as a 1-D integer array ``(N,)`` checked to lie
  in ``[0, C)`` or equal ``ignore_index`` (host arrays by the public layer;
  device arrays by the kernels, which raise :class:`BadLabels` instead of reading
  out of bounds, and the public layer words the error); soft ``labels`` and
  ``v`` as C-contiguous ``(N, C)`` arrays.
* Elementwise families (sigmoid, binary) receive C-contiguous 2-D ``(R, K)``
  arrays (K = size of the last axis, 1 for a 0-d/1-d input reshaped) and
  ``pos_weight`` as ``None``, a Python float, or a C-contiguous ``(K,)`` or
  ``(R, K)`` float64 array.
* Score dtypes are the caller's own: float16, ``ml_dtypes.bfloat16`` (numpy) or
  raw 16-bit storage (CuPy), float32, float64. Accumulation is float32, float64
  for float64 scores.
* ``grad_scale`` selects the pass: ``None`` runs the forward kernel only; else
  the fused forward+backward kernel runs and the gradient of row ``i`` (or of
  element ``(r, k)``) is multiplied by ``grad_scale`` -- a Python float, or an
  array of the loss's 1-D/2-D shape (grad_output times the reduction factor).
* ``inplace=True`` (keyword, ``sparse_softmax_cross_entropy`` of every backend;
  ``softmax_cross_entropy`` of the CUDA backend): with ``grad_scale`` given, the
  gradient is written over the (writeable, C-contiguous) scores and returned as
  the gradient; nothing of the scores' size is allocated and the scores are lost.
  The public layer passes it only for buffers it owns (the logits blocks of
  ``fastxent.linear``).
* Return values: the unreduced loss (``(N,)`` or ``(R, K)``) in the loss dtype
  (float32 for 16-bit scores, else the score dtype) and, when asked, the
  gradient in the first argument's dtype and 2-D shape. Reductions happen in
  the public layer, which asks for the loss's sum instead when the caller
  reduces:
* ``total=True`` (keyword, every loss): the loss is returned as its sum over
  all rows/elements, a float64 0-d array of the arrays' module, so a backend may
  reduce without writing the unreduced loss (Numba's elementwise kernels sum
  per block; CUDA sums its unreduced loss on the device). The public layer
  divides a mean by its denominator and casts to the loss dtype.
* ``inplace=True`` (keyword, only passed when set, only with ``grad_scale`` not
  None; sparse and soft softmax, sigmoid, binary): the gradient is written over
  the first argument, which is returned as the gradient. The public layer
  guarantees the argument is the caller's writable buffer, C-contiguous along
  the class axis, sharing no memory with the labels; the kernel reads whatever it
  still needs of a row (target score, smoothing sums) before overwriting it.

Functions (arrays and options positional, in this order)::

    sparse_softmax_cross_entropy(logits, labels, ignore_index, class_weight,
                                 label_smoothing, z_loss, softcap, grad_scale,
                                 *, total=False, inplace=False)
        -> (loss (N,) | sum, grad (N, C) | None)
    softmax_cross_entropy(logits, labels, label_smoothing, softcap, grad_scale,
                          *, total=False, inplace=False)
        -> (loss (N,) | sum, grad | None)
    sigmoid_cross_entropy(logits, labels, pos_weight, label_smoothing, grad_scale,
                          *, total=False, inplace=False)
        -> (loss (R, K) | sum, grad | None)
    binary_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale,
                         *, total=False, inplace=False)
    categorical_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale, *, total=False)
    sparse_categorical_cross_entropy(probs, labels, epsilon, ignore_index, grad_scale, *, total=False)
    log_softmax(x) -> (N, C);  softmax(x) -> (N, C);  logsumexp(x) -> (N,)
    softmax_cross_entropy_hvp(logits, v) -> (N, C)
    sigmoid_cross_entropy_hessian_diag(logits, labels, pos_weight) -> (R, K)
    score(logits, labels, ignore_index) -> fastxent._score.Score of (N,) arrays

A row split along the class axis (``fastxent.dask``; the merge and what merged
statistics give are ``fastxent/_partials.py``): ``logits`` is a block ``(N, Cb)``
holding classes ``[offset, offset + Cb)`` of rows of C classes; ``labels`` are the
rows' class ids in the whole row (checked by the public layer to lie in ``[0, C)``
or equal ``ignore_index``; a label outside the block is not read); ``class_weight``
is None or the full float64 ``(C,)`` vector, read at ``offset + c``::

    softmax_partials(logits, labels, offset, ignore_index, class_weight, softcap, moments)
        -> Partials of (N,) arrays
    softmax_block_grad(logits, labels, offset, ignore_index, class_weight, softcap,
                       shift, log_sum, p_coef, target_coef, weight_coef) -> grad (N, Cb)

``softmax_partials``: ``labels`` may be None (no target); ``class_weight`` given
(ones when unweighted) asks for the label-smoothing sum ``gap``; ``moments`` asks
for ``score``'s entropy term, argmax and the score there (then ``softcap`` is None).
``softmax_block_grad``: ``grad[i, c] = (P_i p_ic - V_i w_{offset+c} - [offset + c == y_i] Y_i)
dt/dx`` with ``p_ic = exp((t_ic - shift_i) - log_sum_i)`` and the per-row float64
``P, Y, V`` = ``p_coef, target_coef, weight_coef`` (``weight_coef`` None, and
``class_weight`` None, without label smoothing); an ignored row's block is zeros.

``class_weight`` is ``None`` or a float64 ``(C,)`` array; ``ignore_index`` is
``None`` or an int; ``softcap`` is ``None`` or a float > 0; ``epsilon`` is the
lower clip bound and the upper bound is ``1 - epsilon`` rounded to the probs'
dtype (the backend rounds it).
"""

from typing import Any, NamedTuple


class Partials(NamedTuple):
    """Per-row partial statistics of one block of classes (``softmax_partials``'s result).

    Float fields are in the loss dtype, ``best`` int64; each of shape ``(N,)``.

    Attributes
    ----------
    peak : array
        ``m``, the block's largest (soft-capped) score; ``-inf`` for an all ``-inf`` block
        (any value where ``total`` is NaN: the merge makes that row NaN whatever it is).
    total : array
        ``s = sum_c exp(t_c - m)``; 0 for an all ``-inf`` block, NaN when the block
        holds NaN or ``+inf``.
    target : array
        ``t_y`` when the row's label lies in the block and is not ``ignore_index``, else 0.
    anchor : array
        The finite shift of ``gap`` (any finite value the backend chose; 0 without smoothing).
    gap : array
        ``sum_c w_c (anchor - t_c)`` (a zero weight adds 0); 0 without label smoothing.
    spread : array or None
        ``score`` only: ``u = sum_c exp(x_c - m) (x_c - m)``, the entropy term.
    best : array or None
        ``score`` only: the first class id (in the whole row) of the block's max.
    best_value : array or None
        ``score`` only: the score at ``best`` (NaN when the block holds a NaN), which
        decides between blocks.
    """

    peak: Any
    total: Any
    target: Any
    anchor: Any
    gap: Any
    spread: Any
    best: Any
    best_value: Any


class BadLabels(Exception):
    """A device backend's kernels met a class id outside ``[0, C)`` that is not
    ``ignore_index``. Raised without a message of its own: the public layer turns
    it into the ``ValueError`` that names the first offending label."""


#: The functions every backend implements (and the reference, under the same names).
FUNCTIONS = (
    "sparse_softmax_cross_entropy",
    "softmax_cross_entropy",
    "sigmoid_cross_entropy",
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "sparse_categorical_cross_entropy",
    "log_softmax",
    "softmax",
    "logsumexp",
    "softmax_cross_entropy_hvp",
    "sigmoid_cross_entropy_hessian_diag",
    "score",
    "softmax_partials",
    "softmax_block_grad",
)
