"""The result types shared by every backend and the reference: :class:`Score` (of
:func:`fastxent.score`) and :class:`LinearGrad` (of :func:`fastxent.linear_cross_entropy`)."""

from typing import Any, NamedTuple


class Score(NamedTuple):
    """Per-row scoring bundle returned by ``score``.

    Every field has the logits' shape minus the class axis. Float fields have
    the loss dtype (float32 for 16-bit logits, else the logits' dtype); arrays
    live where the logits live (numpy or CuPy).

    Attributes
    ----------
    loss : array
        Unreduced sparse softmax cross-entropy ``lse - x[label]``; 0 for an
        ignored row.
    lse : array
        ``logsumexp`` of the row.
    target_logprob : array
        ``x[label] - lse``; NaN for an ignored row.
    entropy : array
        ``-sum_c p_c log p_c`` of the row's softmax.
    argmax : array of int64
        First index of the row's maximum (``np.argmax``).
    correct : array of bool
        ``argmax == label``; False for an ignored row.
    """

    loss: Any
    lse: Any
    target_logprob: Any
    entropy: Any
    argmax: Any
    correct: Any


class LinearGrad(NamedTuple):
    """The gradients returned by ``linear_cross_entropy(..., return_grad=True)``.

    Each is the gradient of ``sum(grad_output * loss)`` with respect to that argument,
    in its shape and dtype; arrays live where the inputs live (numpy or CuPy).

    Attributes
    ----------
    hidden : array
        ``G @ weight``, ``hidden``'s shape.
    weight : array
        ``G.T @ hidden`` over every row, ``weight``'s shape (accumulated in float32
        for 16-bit inputs).
    bias : array or None
        ``G.sum(0)``, ``(V,)``; None when there is no bias.

    ``G`` is the gradient with respect to the logits ``hidden @ weight.T + bias``,
    never stored whole.
    """

    hidden: Any
    weight: Any
    bias: Any
